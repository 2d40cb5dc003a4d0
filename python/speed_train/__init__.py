"""speed_train: the thin layer that trains DiT / U-Net denoisers with speed_kernels' DiffusionLoss.

    from speed_train import TrainConfig, Trainer
    summary = Trainer(TrainConfig(data="digits", strategy="speed", steps=2000)).run()

Modules: models (DiT, U-Net, build_model), data (datasets, seeded resumable order),
sampling (DDPM / DDIM, save_grid), trainer (Trainer, the training loop) with its parts config
(TrainConfig), distributed, faults and records, checkpoint (atomic rotating checkpoints), cli (the
`speed-kernels` command: analyze, train, sample, compare).
Imports are lazy so that `speed-kernels --help` stays fast.

Layers, bottom to top (tests/test_layering.py holds the package to them): a module imports only
modules of lower layers (and speed_kernels, the library beneath everything).
"""
__version__ = "0.1.0"

LAYERS = (
    ("files", ("latents", "checkpoint")),                    # encode folders and checkpoint files on disk
    ("data", ("data",)),                                     # datasets (latents among them), seeded order
    ("models", ("models", "sampling", "flow_objective", "adapters")),  # networks, samplers, loss glue
    ("features", ("features",)),                             # the feature networks: own classifier, Inception
    ("metrics", ("metrics",)),                               # beside the models: scores images from data
    ("autoencoder", ("autoencoder",)),                       # trains on data, scores decodes with metrics
    ("ranks", ("distributed",)),                             # torchrun: ranks, process group, collectives
    ("engine parts", ("config", "faults", "records")),       # settings, non-finite steps, run records
    ("engine", ("trainer",)),                                # the training loop
    ("study parts", ("strategy_specs", "curves", "compare_report")),  # strategy lists, speed-ups, result files
    ("studies", ("compare",)),                               # strategies against each other, on the engine
    ("cli", ("cli",)),                                       # the `speed-kernels` command, last
)

_LAZY = {
    "TrainConfig": "trainer", "Trainer": "trainer", "load_checkpoint_model": "trainer",
    "build_model": "models", "model_names": "models", "DiT": "models", "UNet": "models",
    "load_dataset": "data", "DataOrder": "data", "ImageData": "data",
    "sample": "sampling", "save_grid": "sampling",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'speed_train' has no attribute {name!r}")
