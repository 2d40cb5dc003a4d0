"""Discrete DDPM noise schedules (float64, on the host).

A :class:`NoiseSchedule` holds the betas of a T-step discrete diffusion process and every
coefficient derived from them, as float64 CPU tensors of length T. Index t runs over 0..T-1;
larger t is noisier; ``alphas_cumprod[t]`` is ᾱ_t and x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε.

Constructors: :meth:`NoiseSchedule.linear`, :meth:`NoiseSchedule.scaled_linear`,
:meth:`NoiseSchedule.cosine`, :meth:`NoiseSchedule.from_betas`,
:meth:`NoiseSchedule.from_diffusers`, :meth:`NoiseSchedule.from_dict`; and
:meth:`NoiseSchedule.rescale_zero_terminal_snr` returns the zero-terminal-SNR version of a schedule.

Every beta must lie in the open interval (0, 1). The single exception is the last beta of a
zero-terminal-SNR schedule, which is exactly 1 (so that ᾱ_{T-1} = 0 exactly and SNR_{T-1} = 0);
such a schedule can only be made by :meth:`rescale_zero_terminal_snr` (or restored by
:meth:`from_dict` from a dictionary that says it is one, or by :meth:`from_diffusers` with
``rescale_betas_zero_snr=True``).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

__all__ = ["NoiseSchedule"]


def _as_float64_1d(values: Any, argname: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        arr = values.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{argname} must be a 1-D sequence of numbers, got {type(values).__name__}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{argname} must be 1-D, got shape {tuple(arr.shape)}")
    return np.array(arr, dtype=np.float64, copy=True)


def _check_T(T: Any) -> int:
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or int(T) < 2:
        raise ValueError(f"T must be an integer >= 2, got {T!r}")
    return int(T)


class NoiseSchedule:
    """A discrete noise schedule of ``T`` steps.

    Attributes (float64 CPU tensors of length ``T`` unless said):

    - ``T`` (int), ``name`` (str)
    - ``betas``: β_t
    - ``alphas``: 1 - β_t
    - ``alphas_cumprod``: ᾱ_t = Π_{s<=t} (1 - β_s)
    - ``snr``: ᾱ_t / (1 - ᾱ_t)  (0 where ᾱ_t = 0; ᾱ_t = 1 cannot happen since every β > 0)
    - ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``
    - ``alphas_cumprod_prev``: ᾱ_{t-1} with ᾱ_{-1} = 1
    - ``posterior_variance``: β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t)
    - ``posterior_log_variance_clipped``: log β̃_t with entry 0 replaced by entry 1 (β̃_0 = 0)
    - ``posterior_mean_coef1``: β_t √ᾱ_{t-1} / (1 - ᾱ_t)   (multiplies x0)
    - ``posterior_mean_coef2``: (1 - ᾱ_{t-1}) √α_t / (1 - ᾱ_t)   (multiplies x_t)
    - ``zero_terminal_snr`` (bool): whether ᾱ_{T-1} is exactly 0.

    The tensors are computed once; treat them as read-only (each property returns the stored tensor).
    """

    def __init__(self, betas: Any, name: str = "custom", *, _zero_terminal: bool = False):
        b = _as_float64_1d(betas, "betas")
        _check_T(b.shape[0])
        if not np.all(np.isfinite(b)):
            raise ValueError("betas must be finite")
        if _zero_terminal:
            inner, last = b[:-1], b[-1]
            if not (np.all(inner > 0.0) and np.all(inner < 1.0) and last == 1.0):
                raise ValueError(
                    "betas of a zero-terminal-SNR schedule must lie in (0, 1) except the last, which must be exactly 1"
                )
        elif not (np.all(b > 0.0) and np.all(b < 1.0)):
            bad = int(np.argmax(~((b > 0.0) & (b < 1.0))))
            raise ValueError(
                f"betas must lie in the open interval (0, 1); betas[{bad}] = {b[bad]!r} "
                "(a terminal beta of exactly 1 is only made by rescale_zero_terminal_snr())"
            )
        alphas = 1.0 - b
        abar = np.cumprod(alphas)
        if abar[0] >= 1.0:
            raise ValueError(f"betas[0] = {b[0]!r} is too small: 1 - betas[0] rounds to 1 in float64")
        if _zero_terminal:
            abar[-1] = 0.0  # exact: 1 - 1 = 0, kept explicit
        self.name = str(name)
        self.T = int(b.shape[0])
        self.zero_terminal_snr = bool(abar[-1] == 0.0)
        self._np = {"betas": b, "alphas": alphas, "alphas_cumprod": abar}
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        one_minus = 1.0 - abar  # > 0 everywhere since abar < 1
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = np.where(abar > 0.0, abar / one_minus, 0.0)
        post_var = b * (1.0 - abar_prev) / one_minus
        post_logvar = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
        derived = {
            "snr": snr,
            "sqrt_alphas_cumprod": np.sqrt(abar),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(one_minus),
            "alphas_cumprod_prev": abar_prev,
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_logvar,
            "posterior_mean_coef1": b * np.sqrt(abar_prev) / one_minus,
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / one_minus,
        }
        self._np.update(derived)
        self._t = {k: torch.from_numpy(v.copy()) for k, v in self._np.items()}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """DDPM / DiT linear schedule: β = linspace(beta_start, beta_end, T).

        DiT's ``get_named_beta_schedule("linear", T)`` scales both ends by 1000/T; pass
        ``beta_start=1e-4 * 1000 / T, beta_end=0.02 * 1000 / T`` to reproduce it for T != 1000."""
        T = _check_T(T)
        return cls(np.linspace(float(beta_start), float(beta_end), T, dtype=np.float64), name="linear")

    @classmethod
    def scaled_linear(cls, T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> "NoiseSchedule":
        """LDM / Stable Diffusion schedule: β = linspace(√beta_start, √beta_end, T)²."""
        T = _check_T(T)
        b = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=np.float64) ** 2
        return cls(b, name="scaled_linear")

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        """Nichol & Dhariwal cosine schedule (diffusers ``squaredcos_cap_v2``):
        f(u) = cos²((u + s)/(1 + s)·π/2), β_t = min(1 - f((t+1)/T)/f(t/T), max_beta)."""
        T = _check_T(T)
        u = np.arange(T + 1, dtype=np.float64) / T
        f = np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2
        b = np.minimum(1.0 - f[1:] / f[:-1], float(max_beta))
        return cls(b, name="cosine")

    @classmethod
    def from_betas(cls, betas: Any, name: str = "custom") -> "NoiseSchedule":
        """A schedule from explicit betas (list, numpy array or tensor); each in (0, 1)."""
        return cls(betas, name=name)

    @classmethod
    def from_diffusers(cls, scheduler_or_config: Any) -> "NoiseSchedule":
        """Build the schedule a diffusers scheduler trains with, without importing diffusers.

        Accepts a plain dict, a diffusers scheduler (anything with a ``.config`` that is
        dict-like or has attributes) or a config object with attributes. Reads
        ``num_train_timesteps`` (1000), ``beta_schedule`` ("linear"; also "scaled_linear",
        "squaredcos_cap_v2"), ``beta_start`` (1e-4), ``beta_end`` (0.02), ``trained_betas``
        (overrides the rest) and ``rescale_betas_zero_snr`` (False); the defaults are diffusers'
        DDPMScheduler defaults. diffusers computes betas in float32; here they are float64
        (relative difference below 1e-6)."""
        cfg = scheduler_or_config
        if not isinstance(cfg, Mapping) and hasattr(cfg, "config"):
            cfg = cfg.config

        def read(key: str, default: Any) -> Any:
            if isinstance(cfg, Mapping):
                val = cfg.get(key, default)
            else:
                val = getattr(cfg, key, default)
            return default if val is None and default is not None else val

        if cfg is None:
            raise TypeError("scheduler_or_config must be a dict, a diffusers scheduler or a config object")
        T = read("num_train_timesteps", 1000)
        trained = read("trained_betas", None)
        kind = read("beta_schedule", "linear")
        start = float(read("beta_start", 0.0001))
        end = float(read("beta_end", 0.02))
        if trained is not None:
            sched = cls.from_betas(trained, name="trained")
        elif kind == "linear":
            sched = cls.linear(T, start, end)
        elif kind == "scaled_linear":
            sched = cls.scaled_linear(T, start, end)
        elif kind == "squaredcos_cap_v2":
            sched = cls.cosine(T)
        else:
            raise ValueError(
                f"beta_schedule {kind!r} is not supported; use one of 'linear', 'scaled_linear', "
                "'squaredcos_cap_v2' or give trained_betas"
            )
        if bool(read("rescale_betas_zero_snr", False)):
            sched = sched.rescale_zero_terminal_snr()
        return sched

    def rescale_zero_terminal_snr(self) -> "NoiseSchedule":
        """Lin et al. 2024: shift and scale √ᾱ so that √ᾱ_{T-1} = 0 exactly and √ᾱ_0 is unchanged:
        √ᾱ ← (√ᾱ - √ᾱ_{T-1})·√ᾱ_0/(√ᾱ_0 - √ᾱ_{T-1}). Returns a new schedule whose last beta is
        exactly 1, so ᾱ_{T-1} = 0 and SNR_{T-1} = 0 exactly. Idempotent."""
        s = np.sqrt(self._np["alphas_cumprod"])
        s0, sT = s[0], s[-1]
        s = (s - sT) * s0 / (s0 - sT)
        abar = s * s
        abar[-1] = 0.0
        alphas = np.concatenate([[abar[0]], abar[1:] / abar[:-1]])
        betas = 1.0 - alphas
        betas[-1] = 1.0
        name = self.name if self.name.endswith("+zsnr") else self.name + "+zsnr"
        return type(self)(betas, name=name, _zero_terminal=True)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        """A JSON-able dict (betas as a list of floats) that :meth:`from_dict` restores exactly."""
        return {
            "name": self.name,
            "T": self.T,
            "betas": [float(x) for x in self._np["betas"]],
            "zero_terminal_snr": self.zero_terminal_snr,
        }

    state_dict = to_dict

    @classmethod
    def from_dict(cls, d: Mapping) -> "NoiseSchedule":
        if not isinstance(d, Mapping) or "betas" not in d:
            raise ValueError("d must be a dict made by NoiseSchedule.to_dict() (with a 'betas' entry)")
        return cls(d["betas"], name=d.get("name", "custom"), _zero_terminal=bool(d.get("zero_terminal_snr", False)))

    # ------------------------------------------------------------------ tensors
    def _get(self, key: str) -> torch.Tensor:
        return self._t[key]

    betas = property(lambda self: self._get("betas"), doc="β_t, float64 [T]")
    alphas = property(lambda self: self._get("alphas"), doc="1 - β_t, float64 [T]")
    alphas_cumprod = property(lambda self: self._get("alphas_cumprod"), doc="ᾱ_t, float64 [T]")
    snr = property(lambda self: self._get("snr"), doc="ᾱ_t/(1-ᾱ_t), float64 [T] (0 where ᾱ_t = 0)")
    sqrt_alphas_cumprod = property(lambda self: self._get("sqrt_alphas_cumprod"))
    sqrt_one_minus_alphas_cumprod = property(lambda self: self._get("sqrt_one_minus_alphas_cumprod"))
    alphas_cumprod_prev = property(lambda self: self._get("alphas_cumprod_prev"))
    posterior_variance = property(lambda self: self._get("posterior_variance"))
    posterior_log_variance_clipped = property(lambda self: self._get("posterior_log_variance_clipped"))
    posterior_mean_coef1 = property(lambda self: self._get("posterior_mean_coef1"))
    posterior_mean_coef2 = property(lambda self: self._get("posterior_mean_coef2"))

    def numpy(self, key: str = "alphas_cumprod") -> np.ndarray:
        """A float64 numpy copy of one of the tables (e.g. ``"alphas_cumprod"``, ``"snr"``)."""
        if key not in self._np:
            raise ValueError(f"key must be one of {sorted(self._np)}, got {key!r}")
        return self._np[key].copy()

    def __len__(self) -> int:
        return self.T

    def __repr__(self) -> str:
        b = self._np["betas"]
        abar = self._np["alphas_cumprod"]
        snr = self._np["snr"]
        return (
            f"NoiseSchedule(name={self.name!r}, T={self.T}, betas=[{b[0]:.3g} .. {b[-1]:.3g}], "
            f"alphas_cumprod=[{abar[0]:.6g} .. {abar[-1]:.3g}], snr=[{snr[0]:.4g} .. {snr[-1]:.3g}]"
            f"{', zero_terminal_snr=True' if self.zero_terminal_snr else ''})"
        )
