"""`FlowMatchingLoss`: continuous-time flow matching (rectified flow) on the fused path.

    loss_fn = FlowMatchingLoss("logit_normal", shift=3.0, seed=0)
    x_t, sigma = loss_fn.noise(x0)                  # sigma float32 [B] in [0, 1], 1 = pure noise
    loss = loss_fn.loss(model(x_t, sigma), x0, sigma)   # target eps - x0; eps regenerated
    loss.backward()

Convention: diffusers' FlowMatch (SD3/FLUX): x_t = (1 - sigma) x0 + sigma eps. SiT's time is
t = 1 - sigma and its target data - noise = -(eps - x0): see :func:`sit_time`,
:func:`sigma_from_sit` and :meth:`FlowMatchingLoss.sit_training_losses`.

Predictions and their losses (w(sigma) from the strategy's weighting, see flow_strategies):
  "v":   target eps - x0 (diffusers), loss w * mean((pred - (eps - x0))^2)
  "x0":  target x0,                    loss w * mean((pred - x0)^2)
  "eps": target eps,                   loss w * mean((pred - eps)^2)
The weight multiplies the MSE of what is predicted; min_snr / p2 convert themselves per target.

Random numbers: the Philox contract of speed_kernels.rng (key from seed and rank, a call counter
in a device tensor). sigma's uniform is word 0 of philox(0, sample, call, stream 2); eps is the
DDPM path's stream 1. sigma = q[j] + f dq[j] from a float32 inverse-CDF table whose arithmetic is
exact but for one rounding, so every backend draws the same sigma bit for bit. Nothing is stored
between noise() and loss(): eps is regenerated from the counter.
"""
from __future__ import annotations

import numpy as np
import torch

from . import flow_strategies as _fs
from . import reference
from .reference import FLOW_NUM_ROWS, FLOW_ROW_DQ, FLOW_ROW_Q, FLOW_ROW_W
from .op_schema import FlowArgs
from .stream import LossStream
from .tables import target_code

FLOW_BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")


def build_flow_tables(strategy: _fs.FlowStrategy, prediction: str) -> torch.Tensor:
    """float32 [FLOW_NUM_ROWS, N + 1]: quantiles, slopes, the weight's smooth part."""
    q, dq = _fs.quantile_rows(strategy.density)
    w = _fs.weight_row(strategy.weighting, prediction)
    if w.shape != q.shape:
        raise ValueError("weight and quantile tables must have the same length")
    rows = np.stack([q, dq, w]).astype(np.float32)
    assert rows.shape[0] == FLOW_NUM_ROWS
    return torch.from_numpy(rows)


def sit_time(sigma: torch.Tensor) -> torch.Tensor:
    """SiT's t (data at t = 1) of a sigma (noise at sigma = 1): t = 1 - sigma."""
    return 1.0 - sigma


def sigma_from_sit(t: torch.Tensor) -> torch.Tensor:
    """sigma of SiT's t: 1 - t. A density in t must be mirrored: t's logit-normal(m, s) is
    sigma's logit-normal(-m, s)."""
    return 1.0 - t


# ------------------------------------------------------------------------------ backends
class _TorchFlow:
    name = "torch"

    def noise(self, x0, sigma_in, a):
        return reference.flow_noise(x0, sigma_in, a.tables, a.k0, a.k1, a.call)

    def loss(self, pred, x0, sigma, a, reduce_mean):
        return reference.flow_loss(pred, x0, sigma, a.tables, a.k0, a.k1, a.call, a.target, a.inv_sigma2, reduce_mean)


class _TritonFlow:
    name = "triton"

    def noise(self, x0, sigma_in, a):
        from .ops import flow_noise

        return flow_noise.flow_noise(x0, sigma_in, a)

    def loss(self, pred, x0, sigma, a, reduce_mean):
        from .ops import flow_loss

        return flow_loss.flow_loss(pred, x0, sigma, a, reduce_mean)


class _ExtFlow:
    """The compiled extension's flow ops: `cpp` on CPU tensors, `cuda` on CUDA tensors."""

    def __init__(self, name: str):
        self.name = name

    def noise(self, x0, sigma_in, a):
        return torch.ops.speed_kernels.flow_noise.default(x0, sigma_in, a.tables, int(a.k0), int(a.k1), a.call)

    def loss(self, pred, x0, sigma, a, reduce_mean):
        from . import flow_ext

        return flow_ext.flow_loss(pred, x0, sigma, a, reduce_mean)


def _triton_ok(device: torch.device) -> bool:
    import os

    if not (device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _ext_ok(device: torch.device) -> bool:
    """Whether speed_kernels._C has flow kernels for this device type (cpp: CPU, cuda: CUDA)."""
    if device.type not in ("cpu", "cuda"):
        return False
    try:
        from . import flow_ext
    except Exception:
        return False
    return flow_ext.available(device.type)


def flow_backends() -> dict:
    """Which flow backends run here ('available' or why not)."""
    cpu = torch.device("cpu")
    return {
        "torch": "available",
        "cpp": "available" if _ext_ok(cpu) else "unavailable (speed_kernels._C without flow ops)",
        "cuda": "available" if torch.cuda.is_available() and _ext_ok(torch.device("cuda"))
        else "unavailable (needs a CUDA device and speed_kernels._C built with the CUDA kernels)",
        "triton": "available" if _triton_ok(torch.device("cuda")) or _triton_ok(cpu)
        else "unavailable (needs CUDA or TRITON_INTERPRET=1)",
    }


def select_flow_backend(name: str, device) -> object:
    device = torch.device(device)
    if name not in FLOW_BACKENDS:
        raise ValueError(f"backend must be one of {FLOW_BACKENDS}, got {name!r}")
    if name == "auto":  # as DiffusionLoss: Triton on CUDA, else the compiled kernels, else the reference
        if device.type == "cuda" and _triton_ok(device):
            return _TritonFlow()
        if _ext_ok(device):
            return _ExtFlow("cuda" if device.type == "cuda" else "cpp")
        return _TorchFlow()
    if name == "torch":
        return _TorchFlow()
    if name == "triton":
        if not _triton_ok(device):
            raise ValueError(f"backend 'triton' does not run on {device} (CUDA, or the CPU with TRITON_INTERPRET=1)")
        return _TritonFlow()
    want = "cpu" if name == "cpp" else "cuda"
    if device.type != want or not _ext_ok(device):
        raise ValueError(f"backend {name!r} is not available on {device} (speed_kernels._C with flow kernels for "
                         f"{want} tensors: {flow_backends()[name]})")
    return _ExtFlow(name)


# ------------------------------------------------------------------------------ the loss
class FlowMatchingLoss(LossStream):
    """Flow-matching loss with strategy-driven sigma sampling and weighting.

    Args:
        strategy: a name of speed_kernels.flow_strategies ("uniform", "logit_normal",
            "mode", "cosmap", "laplace", "edm_lognormal", "beta", "speed", a weighting such as
            "min_snr", or a "sampling+weighting" pair) or a FlowStrategy from flow_strategies.get.
        shift: the time shift s (sigma' = s sigma / (1 + (s - 1) sigma)) applied to the density.
        prediction: "v" (target eps - x0), "x0" or "eps".
        backend: "auto" (triton on CUDA, else the compiled kernels: cpp on the CPU, cuda on
            CUDA, else torch), "triton", "cuda", "cpp" or "torch".
        seed, rank: the Philox key (rank folded in as DiffusionLoss does).
        clamp: optional (lo, hi): the density truncated to that sigma range.
        check_inputs: validate a given sigma's range (one host sync).
        strategy_params: keyword arguments of flow_strategies.get for a strategy given by name.
    """

    _draw_name = "sigma"

    def __init__(self, strategy="uniform", shift: float = 1.0, prediction: str = "v", backend: str = "auto",
                 seed: int | None = 0, rank: int = 0, clamp=None, check_inputs: bool = True,
                 strategy_params: dict | None = None):
        if isinstance(strategy, _fs.FlowStrategy):
            if strategy_params or shift != 1.0 or clamp is not None:
                raise ValueError("shift, clamp and strategy_params go with a strategy given by name "
                                 "(pass them to flow_strategies.get instead)")
        elif not isinstance(strategy, str):
            raise TypeError(f"strategy must be a name or a FlowStrategy, got {type(strategy).__name__}")
        else:
            params = dict(strategy_params or {})
            shift = float(params.pop("shift", shift))  # shift/clamp may also come as strategy parameters
            clamp = params.pop("clamp", clamp)
            strategy = _fs.get(strategy, shift=shift, clamp=clamp, **params)
        self.strategy = strategy
        self.shift = float(shift)
        if prediction not in _fs.PREDICTIONS:
            raise ValueError(f"prediction must be one of {_fs.PREDICTIONS}, got {prediction!r}")
        self.prediction = prediction
        self.target = target_code(prediction)
        if backend not in FLOW_BACKENDS:
            raise ValueError(f"backend must be one of {FLOW_BACKENDS}, got {backend!r}")
        self.backend_name = backend
        self.check_inputs = check_inputs
        self.inv_sigma2 = bool(strategy.weighting.inv_sigma2)
        self._init_stream(seed, rank)
        self._host_tables = build_flow_tables(strategy, prediction)
        self._args: dict = {}
        self._backend_cache: dict = {}
        self.last_terms: torch.Tensor | None = None

    # ---------------------------------------------------------------- plumbing
    def op_args(self, device) -> FlowArgs:
        """The named arguments of the flow backends on `device` (cached per counter)."""
        call = self._counter(device)
        a = self._args.get(call.device)
        if a is None or a.call is not call:
            a = self._args[call.device] = FlowArgs(self.tables(call.device), self.k0, self.k1, call, self.target,
                                                   self.inv_sigma2)
        return a

    def backend(self, device, dtype=torch.float32):
        key = (device, dtype)
        b = self._backend_cache.get(key)  # selected once per device and dtype
        if b is None:
            if self.backend_name == "auto" and dtype == torch.float64:
                b = _TorchFlow()
            else:
                b = select_flow_backend(self.backend_name, device)
            self._backend_cache[key] = b
        return b

    def sigma_pdf(self, sigma) -> np.ndarray:
        """The density sigma is drawn from (float64, for plots and tests)."""
        return self.strategy.pdf(sigma)

    def weight(self, sigma) -> np.ndarray:
        """The loss weight at sigma for this prediction (float64)."""
        return self.strategy.weight(sigma, self.prediction)

    # ---------------------------------------------------------------- checks
    @staticmethod
    def _check_x0(x0) -> None:
        if not isinstance(x0, torch.Tensor):
            raise TypeError(f"x0 must be a tensor, got {type(x0).__name__}")
        if not x0.is_floating_point():
            raise TypeError(f"x0 must be a floating-point tensor, got {x0.dtype}")
        if x0.dim() < 2 or x0.numel() == 0:
            raise ValueError(f"x0 must be a non-empty batch with a feature dimension, got shape {tuple(x0.shape)}")

    def _check_sigma(self, sigma, x0) -> torch.Tensor:
        if not isinstance(sigma, torch.Tensor):
            raise TypeError(f"sigma must be a float tensor, got {type(sigma).__name__}")
        if not sigma.is_floating_point():
            raise TypeError(f"sigma must be a floating-point tensor, got {sigma.dtype}")
        if sigma.shape != (x0.shape[0],):
            raise ValueError(f"sigma must have shape ({x0.shape[0]},) to match x0, got {tuple(sigma.shape)}")
        if sigma.device != x0.device:
            raise ValueError(f"sigma is on {sigma.device} but x0 is on {x0.device}")
        if self.check_inputs:
            lo, hi = float(sigma.min()), float(sigma.max())
            if not (0.0 <= lo and hi <= 1.0):
                raise ValueError(f"sigma must lie in [0, 1], got values in [{lo}, {hi}]")
        return sigma.to(torch.float32)

    # ---------------------------------------------------------------- ops
    def noise(self, x0: torch.Tensor, sigma: torch.Tensor | None = None):
        """(x_t, sigma): sigma drawn from the strategy (or the given one), x_t = (1 - sigma) x0 +
        sigma eps in x0's dtype, sigma float32 [B]. Advances the call counter."""
        self._check_x0(x0)
        given = sigma
        if sigma is not None:
            sigma = self._check_sigma(sigma, x0)
        x_t, sigma = self.backend(x0.device, x0.dtype).noise(x0, sigma, self.op_args(x0.device))
        self.step += 1
        self._remember_draw(x0, sigma, given)
        return x_t, sigma

    def loss(self, pred: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, reduction: str = "mean"):
        """Weighted loss of the latest noise() call's eps (regenerated): batch mean ("mean") or
        per-sample float32 [B] ("none")."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        self._check_x0(x0)
        if not isinstance(pred, torch.Tensor) or not pred.is_floating_point():
            raise TypeError("pred must be a floating-point tensor")
        if pred.shape != x0.shape:
            raise ValueError(f"pred has shape {tuple(pred.shape)}, expected {tuple(x0.shape)} (the shape of x0)")
        if pred.device != x0.device:
            raise ValueError(f"pred is on {pred.device} but x0 is on {x0.device}")
        if not isinstance(sigma, torch.Tensor) or sigma.shape != (x0.shape[0],) or sigma.device != x0.device:
            raise ValueError(f"sigma must be a tensor of shape ({x0.shape[0]},) on {x0.device}")
        self._check_draw(x0, sigma)
        out, terms = self.backend(x0.device, pred.dtype).loss(pred, x0, sigma, self.op_args(x0.device),
                                                              reduction == "mean")
        self.last_terms = terms
        return out

    def __call__(self, model, x0: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """noise -> model(x_t, sigma, **model_kwargs) -> weighted loss (batch mean)."""
        x_t, sigma = self.noise(x0)
        return self.loss(model(x_t, sigma, **model_kwargs), x0, sigma)

    def sit_training_losses(self, model, x1: torch.Tensor, model_kwargs: dict | None = None) -> dict:
        """SiT's `training_losses(model, x1, model_kwargs)` on this object's sampling: the model
        is called with SiT's t = 1 - sigma and predicts data - noise; returns {"loss": [B]}.
        (Requires prediction="v".)"""
        if self.prediction != "v":
            raise ValueError("sit_training_losses needs prediction='v' (SiT's velocity)")
        x_t, sigma = self.noise(x1)
        out = model(x_t, sit_time(sigma), **(model_kwargs or {}))
        return {"loss": self.loss(-out, x1, sigma, reduction="none")}

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {**self._stream_state(), "strategy": self.strategy.name, "shift": self.shift,
                "prediction": self.prediction}

    def load_state_dict(self, state: dict) -> None:
        self._load_stream_state(state, expect={"prediction": self.prediction, "strategy": self.strategy.name})
        self._args.clear()

    def __repr__(self) -> str:
        return (f"FlowMatchingLoss({self.strategy!r}, shift={self.shift}, prediction={self.prediction!r}, "
                f"backend={self.backend_name!r}, seed={self.seed}, rank={self.rank})")


__all__ = ["FlowMatchingLoss", "build_flow_tables", "sit_time", "sigma_from_sit", "flow_backends",
           "select_flow_backend"]
