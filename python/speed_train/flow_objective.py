"""The flow-matching objective for the trainer (`--objective flow`).

`FlowObjective` wraps a `speed_kernels.FlowMatchingLoss` behind the interface the training loop
already uses for DiffusionLoss: `noise(x0) -> (x_t, t)` where t is the model's time input
(sigma * 1000, diffusers' timestep convention), and `loss(pred, x0, t)`. The sigma of the latest
noise() call is kept (a [B] tensor, no sync) so the loss weights the exact drawn sigma.
"""
from __future__ import annotations

import torch

TIME_SCALE = 1000.0
FLOW_SAMPLERS = ("euler", "heun")


class FlowObjective:
    def __init__(self, strategy="uniform", strategy_params: dict | None = None, prediction: str = "v",
                 backend: str = "auto", seed: int = 0, rank: int = 0):
        from speed_kernels import FlowMatchingLoss

        params = dict(strategy_params or {})
        shift = float(params.pop("shift", 1.0))
        clamp = params.pop("clamp", None)
        self.loss_fn = FlowMatchingLoss(strategy, shift=shift, prediction=prediction, backend=backend, seed=seed,
                                        rank=rank, clamp=clamp, strategy_params=params or None)
        self.shift = shift
        self.strategy = self.loss_fn.strategy
        self._t = None
        self._sigma = None

    def noise(self, x0: torch.Tensor):
        x_t, sigma = self.loss_fn.noise(x0)
        t = sigma * TIME_SCALE
        self._t, self._sigma = t, sigma
        return x_t, t

    def loss(self, pred, x0, t, reduction: str = "mean"):
        sigma = self._sigma if t is self._t else (t / TIME_SCALE).clamp(0.0, 1.0)
        return self.loss_fn.loss(pred, x0, sigma, reduction=reduction)

    def backend(self, device, dtype=torch.float32):
        return self.loss_fn.backend(device, dtype)

    def state_dict(self) -> dict:
        return self.loss_fn.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loss_fn.load_state_dict(state)

    def __repr__(self) -> str:
        return f"FlowObjective({self.loss_fn!r})"


def make_flow_loss(cfg, rank: int = 0) -> FlowObjective:
    return FlowObjective(cfg.strategy, cfg.strategy_params, prediction=cfg.prediction, backend=cfg.backend,
                         seed=cfg.seed, rank=rank)
