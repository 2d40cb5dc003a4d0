"""Drop-in adapters: SpeeD (or any strategy of speed_kernels) inside existing training scripts.

DiT / guided-diffusion (``train.py`` of facebookresearch/DiT)::

    diffusion = create_speed_diffusion(timestep_respacing="", strategy="speed")   # was create_diffusion(...)
    t = diffusion.sample_timesteps(x.shape[0], device)                            # was torch.randint(...)
    loss_dict = diffusion.training_losses(model, x, t, dict(y=y))                 # unchanged
    loss = loss_dict["loss"].mean()                                               # unchanged

diffusers (``train_*.py`` scripts)::

    speed = DiffusersLoss(noise_scheduler, strategy="speed")
    timesteps = speed.sample_timesteps(bsz, latents.device)          # was torch.randint(...)
    noisy_latents = speed.add_noise(latents, noise, timesteps)       # was noise_scheduler.add_noise(...)
    model_pred = unet(noisy_latents, timesteps, ...).sample          # unchanged
    loss = speed.loss(model_pred, latents, noise, timesteps)         # was F.mse_loss(model_pred, target)

Both wrap a :class:`speed_kernels.DiffusionLoss`, so the fused kernels, the counter-based RNG and
the strategy tables are the same as in the project's own trainer. ``docs/adapters.md`` shows both
as diffs. Sampling stays with the original code (DiT's ``create_diffusion(str(steps))``, diffusers'
schedulers): the strategies change training only.

Distributed training: ``rank=None`` (the default) takes the rank from ``torch.distributed`` when a
process group is initialised (else 0), so every DDP rank draws its own t and eps from the same seed.

Step accounting: the strategy's training step (CLTS's curriculum follows it) advances once per
``sample_timesteps`` call; ``training_losses`` / ``add_noise`` / ``loss`` never move it.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from speed_kernels import DiffusionLoss, NoiseSchedule
from speed_kernels import strategies as _strategies
from speed_kernels.tables import ROW_WEIGHT

__all__ = ["SpeeDDiffusion", "create_speed_diffusion", "DiffusersLoss", "DIFFUSERS_PREDICTION_TYPES"]


def _resolve_rank(rank: int | None) -> int:
    """rank None: this process's torch.distributed rank when a process group is initialised, else
    0, so DDP ranks draw different t and eps without the caller passing anything."""
    if rank is None:
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"rank must be a non-negative int or None, got {rank!r}")
    return rank


def _resolve_strategy(strategy: Any, strategy_params: Mapping | None) -> Any:
    # The core's "uniform" is weight 1 on the MSE of whatever the model predicts, so the adapters
    # reproduce the original scripts' unweighted loss with it directly.
    if strategy_params:
        return _strategies.get(strategy, **dict(strategy_params))
    return strategy


def _draw_timesteps(loss_fn: DiffusionLoss, n: int, device: Any) -> torch.Tensor:
    """n time steps from the strategy of ``loss_fn`` (mirror step included), on ``device``.

    Goes through the public ``noise`` call with a dummy [n, 1] zero batch and zero noise: that path
    draws t from the strategy's table with the loss object's own Philox stream, advances the call
    counter and the step, and draws no eps."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    z = torch.zeros(n, 1, device=device)
    _, t = loss_fn.noise(z, noise=z)
    return t


class SpeeDDiffusion:
    """Stands in for DiT's ``GaussianDiffusion`` in training.

    ``training_losses(model, x_start, t, model_kwargs=None, noise=None)`` returns, per sample, as DiT
    does: ``"loss"`` and ``"mse"``, plus ``"vb"`` when the model learns σ (2C output channels:
    prediction and variance values; the VLB term with the predicted mean detached, "learned range"
    variance, in bits, the discretized-Gaussian NLL at t = 0). The strategy's weight multiplies the
    MSE term only (SpeeD's code does the same with DiT); ``"mse"`` is that weighted term, so
    ``loss == mse + vb`` as in DiT, and ``"weight"`` holds the weight of each sample.

    Build it with :func:`create_speed_diffusion` (DiT's argument style) or directly from a
    :class:`NoiseSchedule`.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        strategy: Any = "speed",
        *,
        learn_sigma: bool = True,
        predict_xstart: bool = False,
        strategy_params: Mapping | None = None,
        backend: str = "auto",
        seed: int | None = 0,
        rank: int | None = None,
    ):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a speed_kernels.NoiseSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.learn_sigma = bool(learn_sigma)
        self.loss_fn = DiffusionLoss(
            schedule,
            strategy=_resolve_strategy(strategy, strategy_params),
            prediction="x0" if predict_xstart else "eps",
            learn_sigma=self.learn_sigma,
            backend=backend,
            seed=seed,
            rank=_resolve_rank(rank),
        )
        # DiT's GaussianDiffusion exposes these as float64 numpy arrays
        self.num_timesteps = int(schedule.T)
        self.betas = schedule.betas.numpy().astype(np.float64)
        self.alphas_cumprod = schedule.alphas_cumprod.numpy().astype(np.float64)

    @property
    def strategy(self):
        return self.loss_fn.strategy

    def sample_timesteps(self, n: int, device: Any = "cpu") -> torch.Tensor:
        """int64 [n] time steps drawn from the strategy (replaces DiT's ``torch.randint``)."""
        return _draw_timesteps(self.loss_fn, n, device)

    def training_losses(self, model, x_start: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None, noise=None):
        """DiT's ``GaussianDiffusion.training_losses`` with the strategy's weights on the MSE term.

        ``t`` is honoured as given (draw it with :meth:`sample_timesteps` to get the strategy's
        sampling). ``noise`` given: that tensor is ε; None: ε comes from the loss object's own
        counter-based stream (regenerated inside the loss, never stored)."""
        if model_kwargs is None:
            model_kwargs = {}
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"t must be an int64 tensor of time steps, got {type(t).__name__}")
        step = self.loss_fn.step
        x_t, t = self.loss_fn.noise(x_start, t=t, noise=noise)
        self.loss_fn.step = step  # the step is counted by sample_timesteps
        model_output = model(x_t, t, **model_kwargs)
        loss = self.loss_fn.loss(model_output, x_start, t, reduction="none", noise=noise)
        terms = {"loss": loss, "mse": self.loss_fn.last_terms["mse"]}
        if self.learn_sigma:
            terms["vb"] = self.loss_fn.last_terms["vb"]
        terms["weight"] = self.loss_fn.tables(x_start.device)[ROW_WEIGHT][t]
        return terms

    def state_dict(self) -> dict:
        """RNG and strategy state: save it with DiT's checkpoint so a resumed run continues the stream."""
        return self.loss_fn.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loss_fn.load_state_dict(state)

    def __repr__(self) -> str:
        return f"SpeeDDiffusion(T={self.num_timesteps}, learn_sigma={self.learn_sigma}, loss_fn={self.loss_fn!r})"


def create_speed_diffusion(
    timestep_respacing: str | None = "",
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
    *,
    strategy: Any = "speed",
    strategy_params: Mapping | None = None,
    backend: str = "auto",
    seed: int | None = 0,
    rank: int | None = None,
) -> SpeeDDiffusion:
    """The training diffusion of DiT's ``create_diffusion`` (same arguments and defaults), with a strategy.

    ``noise_schedule`` "linear" is DiT's (β from 1e-4 to 0.02 scaled by 1000/diffusion_steps);
    "squaredcos_cap_v2" is the cosine schedule. Training only: ``timestep_respacing`` must be ""
    (or None); sample with DiT's own ``create_diffusion(str(num_sampling_steps))``. ``use_kl`` (pure
    VLB training) is not offered; ``sigma_small`` only matters for sampling and is accepted."""
    if timestep_respacing not in ("", None):
        raise ValueError(
            f"timestep_respacing={timestep_respacing!r}: the SpeeD adapter is for training, which DiT runs "
            "with timestep_respacing=''; sample with DiT's create_diffusion(str(num_sampling_steps))"
        )
    if use_kl:
        raise ValueError("use_kl=True (pure VLB training) is not supported; DiT trains with use_kl=False")
    if not isinstance(diffusion_steps, int) or diffusion_steps < 2:
        raise ValueError(f"diffusion_steps must be an int >= 2, got {diffusion_steps!r}")
    if noise_schedule == "linear":
        scale = 1000.0 / diffusion_steps
        schedule = NoiseSchedule.linear(diffusion_steps, beta_start=scale * 1e-4, beta_end=scale * 0.02)
    elif noise_schedule in ("squaredcos_cap_v2", "cosine"):
        schedule = NoiseSchedule.cosine(diffusion_steps)
    else:
        raise ValueError(f"noise_schedule must be 'linear' or 'squaredcos_cap_v2', got {noise_schedule!r}")
    if rescale_learned_sigmas and diffusion_steps != 1000:
        # guided-diffusion's RESCALED_MSE multiplies the VLB term by T / 1000: a no-op at T = 1000
        raise ValueError("rescale_learned_sigmas=True is only supported with diffusion_steps=1000 (where it is a no-op)")
    del sigma_small
    return SpeeDDiffusion(
        schedule,
        strategy,
        learn_sigma=learn_sigma,
        predict_xstart=predict_xstart,
        strategy_params=strategy_params,
        backend=backend,
        seed=seed,
        rank=rank,
    )


DIFFUSERS_PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _config_get(scheduler: Any, key: str, default: Any) -> Any:
    cfg = scheduler
    if not isinstance(cfg, Mapping) and hasattr(cfg, "config"):
        cfg = cfg.config
    if isinstance(cfg, Mapping):
        val = cfg.get(key, default)
    else:
        val = getattr(cfg, key, default)
    return default if val is None else val


class DiffusersLoss:
    """Replaces ``noise_scheduler.add_noise(...)`` + ``F.mse_loss(...)`` in a diffusers training script.

    Args:
        noise_scheduler: the script's scheduler (e.g. ``DDPMScheduler``) or its config as a plain dict;
            its betas, T and zero-terminal-SNR flag become the :class:`NoiseSchedule`.
        strategy: a strategy name of ``speed_kernels.strategies`` (``"speed"``, ``"min-snr"``, ...) or object.
        prediction_type: "epsilon", "v_prediction" or "sample"; None reads the scheduler's
            ``config.prediction_type`` (diffusers' default "epsilon").

    With ``strategy="uniform"`` and ``torch.randint`` time steps, ``loss`` equals
    ``F.mse_loss(model_pred.float(), target.float())`` with ``target = noise`` or
    ``noise_scheduler.get_velocity(latents, noise, timesteps)``.
    Other strategies' weights are defined on the ε objective, as in their papers, and expressed on
    the target by the core (v: × ᾱ_t; Min-SNR has its own v form min(SNR, γ)/(SNR + 1), which is
    diffusers' ``--snr_gamma`` for v-prediction).
    """

    def __init__(
        self,
        noise_scheduler: Any,
        strategy: Any = "speed",
        prediction_type: str | None = None,
        *,
        strategy_params: Mapping | None = None,
        backend: str = "auto",
        seed: int | None = 0,
        rank: int | None = None,
    ):
        if prediction_type is None:
            prediction_type = _config_get(noise_scheduler, "prediction_type", "epsilon")
        if prediction_type not in DIFFUSERS_PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {', '.join(DIFFUSERS_PREDICTION_TYPES)}, got {prediction_type!r}"
            )
        self.prediction_type = prediction_type
        self.schedule = NoiseSchedule.from_diffusers(noise_scheduler)
        self.loss_fn = DiffusionLoss(
            self.schedule,
            strategy=_resolve_strategy(strategy, strategy_params),
            prediction=DIFFUSERS_PREDICTION_TYPES[prediction_type],
            learn_sigma=False,
            backend=backend,
            seed=seed,
            rank=_resolve_rank(rank),
        )

    @property
    def strategy(self):
        return self.loss_fn.strategy

    @property
    def num_train_timesteps(self) -> int:
        return int(self.schedule.T)

    def sample_timesteps(self, bsz: int, device: Any = "cpu") -> torch.Tensor:
        """int64 [bsz] time steps from the strategy (replaces ``torch.randint(0, T, (bsz,))``)."""
        return _draw_timesteps(self.loss_fn, bsz, device)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """√ᾱ_t·latents + √(1-ᾱ_t)·noise in latents' dtype (what ``noise_scheduler.add_noise`` returns)."""
        if not isinstance(noise, torch.Tensor):
            raise TypeError("noise must be a tensor (diffusers scripts draw it with torch.randn_like)")
        x_t, _ = self.loss_fn.noise(latents, t=timesteps, noise=noise)
        return x_t

    def loss(
        self,
        model_pred: torch.Tensor,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Weighted MSE of ``model_pred`` against the target of ``prediction_type`` (float32).

        Per-sample mean over non-batch dims, times the strategy's weight at each t, then the batch
        mean ("mean") or per sample ("none"). For equal-sized samples this is diffusers'
        ``F.mse_loss`` when the weights are 1."""
        if not isinstance(noise, torch.Tensor):
            raise TypeError("noise must be the tensor given to add_noise")
        return self.loss_fn.loss(model_pred, latents, timesteps, reduction=reduction, noise=noise)

    def state_dict(self) -> dict:
        return self.loss_fn.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loss_fn.load_state_dict(state)

    def __repr__(self) -> str:
        return f"DiffusersLoss(prediction_type={self.prediction_type!r}, loss_fn={self.loss_fn!r})"
