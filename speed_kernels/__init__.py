"""speed-kernels: SpeeD time-step sampling and change-aware weighting for diffusion training,
with the strategies it is compared with, on fused kernels.

    from speed_kernels import DiffusionLoss, NoiseSchedule
    loss_fn = DiffusionLoss(NoiseSchedule.linear(), strategy="speed", seed=0)
    loss = loss_fn(model, x0, y=labels)

Names are imported on first use, so `import speed_kernels` stays cheap (no matplotlib, no
Triton compilation) until a piece is needed.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "DiffusionLoss": ("speed_kernels.loss", "DiffusionLoss"),
    "NoiseSchedule": ("speed_kernels.schedules", "NoiseSchedule"),
    "backends": ("speed_kernels.backends", "backends"),
    "strategies": ("speed_kernels.strategies", None),
    "analysis": ("speed_kernels.analysis", None),
    "rng": ("speed_kernels.rng", None),
    "reference": ("speed_kernels.reference", None),
    "FlowMatchingLoss": ("speed_kernels.flow", "FlowMatchingLoss"),
    "flow_strategies": ("speed_kernels.flow_strategies", None),
}

__all__ = ["DiffusionLoss", "NoiseSchedule", "strategies", "analysis", "rng", "backends", "FlowMatchingLoss", "flow_strategies", "__version__"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'speed_kernels' has no attribute {name!r}")
    module, attr = _LAZY[name]
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
