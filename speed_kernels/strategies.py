"""Time-step strategies as tables.

Every strategy is, for a :class:`~speed_kernels.schedules.NoiseSchedule` of T steps, two float64
tables on the host:

- ``probs(schedule, step=0)``: the distribution each drawn t follows (before any mirroring);
- ``weights(schedule, prediction="eps")``: the loss weight of a sample at t, on the MSE of the
  prediction target ("eps", "v" or "x0").

Conventions for the prediction target. A weight of 1 (uniform, the re-sampling strategies,
importance sampling) means the plain MSE of whatever target is trained. Weightings published as a
formula on the ε MSE (P2, SpeeD v1's P2 weights) give for "v" and "x0" the *same objective*
expressed on the target's MSE: for a fixed x_t, ‖x0̂ - x0‖² = ‖ε̂ - ε‖²/SNR_t and
‖v̂ - v‖² = ‖ε̂ - ε‖²/ᾱ_t, so w_x0 = w_ε·SNR_t and w_v = w_ε·ᾱ_t (= w_ε·SNR_t/(1 + SNR_t)).
Min-SNR's three published forms follow this rule; EDM's λ(σ) is converted from the x0 error the
same way. SpeeD (both variants) keeps the same table for every target, as its official code does
for x0 (its CAW multiplies whatever MSE the model is trained on).

Registry: :func:`get` (unknown name → ``ValueError`` listing the known names), :func:`names`,
:func:`combine` (sampling table of one strategy, weighting table of another). ``get("a+b")`` is
``combine(get("a"), get("b"))``.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Dict, Mapping

import numpy as np
import torch
from scipy.special import ndtr

from speed_kernels.process import areas, mirror_pivot
from speed_kernels.schedules import NoiseSchedule

__all__ = [
    "Strategy",
    "get",
    "names",
    "combine",
    "register",
    "mirror_probs",
    "effective_probs",
    "PREDICTIONS",
]

PREDICTIONS = ("eps", "v", "x0")


# ---------------------------------------------------------------------------- helpers
def _check_schedule(schedule: Any) -> NoiseSchedule:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    return schedule


def _check_prediction(prediction: Any) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    return prediction


def _check_step(step: Any) -> int:
    if isinstance(step, torch.Tensor):
        step = int(step.item())
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    return int(step)


def _number(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value!r}")
    return v


def _whole(name: str, value: Any, *, lo: int) -> int:
    v = _number(name, value, lo=float(lo))
    if v != int(v):
        raise ValueError(f"{name} must be a whole number >= {lo}, got {value!r}")
    return int(v)


def _table(arr: np.ndarray, what: str, name: str) -> torch.Tensor:
    arr = np.asarray(arr, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"strategy {name!r} produced a non-finite {what} table")
    if np.any(arr < 0):
        raise ValueError(f"strategy {name!r} produced a negative {what} table")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _normalise(p: np.ndarray, name: str) -> np.ndarray:
    s = p.sum()
    if not (s > 0 and math.isfinite(s)):
        raise ValueError(f"strategy {name!r}: sampling density has no mass on this schedule")
    return p / s


def _eps_to_target(w_eps: np.ndarray, schedule: NoiseSchedule, prediction: str) -> np.ndarray:
    """Express a weight on the ε MSE as the weight of the same objective on the target's MSE."""
    if prediction == "eps":
        return w_eps
    if prediction == "v":
        return w_eps * schedule.numpy("alphas_cumprod")
    return w_eps * schedule.numpy("snr")


def mirror_probs(probs: Any, pivot: int) -> torch.Tensor:
    """Distribution of d = |t - pivot| when t ~ probs (the official SpeeD mirror step). float64 [T]."""
    p = torch.as_tensor(probs, dtype=torch.float64).cpu().numpy()
    T = p.shape[0]
    if isinstance(pivot, bool) or not isinstance(pivot, (int, np.integer)) or not 0 <= pivot <= T - 1:
        raise ValueError(f"pivot must be an integer in [0, {T - 1}], got {pivot!r}")
    d = np.abs(np.arange(T) - int(pivot))
    out = np.bincount(d, weights=p, minlength=T)[:T]
    return torch.from_numpy(out)


def effective_probs(probs: Any, pivot: int, batch_size: int | None = None) -> torch.Tensor:
    """Distribution of the t of a random sample of a batch made as the official SpeeD code makes it:
    the first B//2 + 1 steps drawn from ``probs``, the rest the mirror |t - pivot| of the first ones.
    ``batch_size=None`` gives the large-batch limit (half and half). float64 [T]."""
    p = torch.as_tensor(probs, dtype=torch.float64).cpu()
    m = mirror_probs(p, pivot)
    if batch_size is None:
        frac = 0.5
    else:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        B = int(batch_size)
        drawn = min(B // 2 + 1, B)
        frac = (B - drawn) / B
    return (1.0 - frac) * p + frac * m


# ---------------------------------------------------------------------------- base class
class Strategy:
    """Base class: uniform sampling, weight 1. Subclasses override ``_probs`` / ``_weights_eps``
    (or ``_weights`` for target-specific forms) and set ``name``, ``params``, ``dynamic``, ``mirror``.

    Public API: ``probs(schedule, step=0)``, ``weights(schedule, prediction="eps")``,
    ``update(t, per_sample_losses)``, ``state_dict()``, ``load_state_dict(d)``, ``pivot(schedule)``,
    attributes ``name``, ``params``, ``dynamic``, ``mirror``."""

    name: str = "uniform"
    dynamic: bool = False
    mirror: bool = False

    def __init__(self, **params: Any):
        if params:
            raise ValueError(f"strategy {self.name!r} takes no parameters, got {sorted(params)}")
        self.params: Dict[str, Any] = {}

    # tables ------------------------------------------------------------------
    def probs(self, schedule: NoiseSchedule, step: int = 0) -> torch.Tensor:
        """float64 [T], non-negative, sums to 1: the distribution of each drawn t (before mirroring)."""
        _check_schedule(schedule)
        step = _check_step(step)
        p = _normalise(np.asarray(self._probs(schedule, step), dtype=np.float64), self.name)
        return _table(p, "probs", self.name)

    def weights(self, schedule: NoiseSchedule, prediction: str = "eps") -> torch.Tensor:
        """float64 [T], finite and non-negative: the loss weight of a sample at t on the target's MSE."""
        _check_schedule(schedule)
        _check_prediction(prediction)
        return _table(self._weights(schedule, prediction), "weights", self.name)

    def _probs(self, schedule: NoiseSchedule, step: int) -> np.ndarray:
        return np.full(schedule.T, 1.0 / schedule.T)

    def _weights(self, schedule: NoiseSchedule, prediction: str) -> np.ndarray:
        """Weight 1: the plain MSE of whatever target is trained (override for other weightings)."""
        return np.ones(schedule.T)


    def pivot(self, schedule: NoiseSchedule) -> int:
        """The official SpeeD mirror pivot m = argmax(∂_t √(1-ᾱ_t) < 1e-4) + 1 (642 on linear);
        see :func:`speed_kernels.analysis.mirror_pivot`. Only used when ``mirror`` is True."""

        return mirror_pivot(_check_schedule(schedule))

    # state -------------------------------------------------------------------
    def update(self, t: Any, per_sample_losses: Any) -> None:
        """Record the per-sample losses of the steps t (no-op unless the strategy is stateful)."""
        return None

    def state_dict(self) -> dict:
        return {"name": self.name, "params": dict(self.params)}

    def load_state_dict(self, d: Mapping) -> None:
        if not isinstance(d, Mapping) or d.get("name") != self.name:
            raise ValueError(
                f"state_dict is for strategy {d.get('name') if isinstance(d, Mapping) else d!r}, not {self.name!r}"
            )
        if "params" in d and dict(d["params"]) != self.params:
            type(self).__init__(self, **dict(d["params"]))  # re-validates; resets any state

    def __repr__(self) -> str:
        ps = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        flags = []
        if self.mirror:
            flags.append("mirror")
        if self.dynamic:
            flags.append("dynamic")
        fl = f" [{', '.join(flags)}]" if flags else ""
        return f"Strategy({self.name!r}{', ' + ps if ps else ''}){fl}"


class _EpsWeighting(Strategy):
    """A weighting defined on the ε MSE (``_weights_eps``), converted to the target's MSE."""

    def _weights(self, schedule: NoiseSchedule, prediction: str) -> np.ndarray:
        return _eps_to_target(self._weights_eps(schedule), schedule, prediction)

    def _weights_eps(self, schedule: NoiseSchedule) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class Uniform(Strategy):
    name = "uniform"


# ---------------------------------------------------------------------------- SpeeD
def speed_caw(schedule: NoiseSchedule, lam: float, tau: int | None) -> np.ndarray:
    """SpeeD's change-aware weighting: g = numpy.gradient(1 - ᾱ), ĝ = (g - min g)/(max g - min g),
    w = (1 - λ) + (2λ - 1)·ĝ for t < τ and 1 for t ≥ τ (``tau=None``: the formula for every t)."""
    g = np.gradient(1.0 - schedule.numpy("alphas_cumprod"))
    span = g.max() - g.min()
    gh = (g - g.min()) / span if span > 0 else np.zeros_like(g)
    w = (1.0 - lam) + (2.0 * lam - 1.0) * gh
    if tau is not None:
        w[int(tau):] = 1.0
    return w


class SpeeD(Strategy):
    """SpeeD (Wang et al. 2024): asymmetric sampling + change-aware weighting (CAW).

    Sampling: p_t = k/(kτ + T - τ) for t < τ and 1/(kτ + T - τ) for t ≥ τ (probability ratio k).

    ``variant="code"`` (default; the official code that produced the published numbers): the
    mirrored half batch is on (``mirror=True``: the first B//2+1 steps are drawn, the rest are
    |t - m|, m = :meth:`pivot`), and the CAW weight is 1 for t ≥ τ.

    ``variant="paper"`` (the paper's text): no mirror, and the CAW formula
    w = (1-λ) + (2λ-1)·ĝ_t applied for every t, so the weight falls towards 1 - λ (0.4 at λ = 0.6)
    in the convergence area. The paper's figure draws it decaying towards 0 there; that is not what
    its formula gives (ĝ → 0 gives 1 - λ, never 0), so we follow the formula as written.

    ``mirror`` overrides the variant's mirror default. ``tau`` is an int in [0, T] (checked against
    T when a table is built) or ``"auto"`` (:func:`speed_kernels.analysis.areas` ``["tau"]``: 700 on
    linear). Weights: the same table for every prediction target (see the module docstring).
    Validation: k < 1, λ outside [0.5, 1], τ outside [0, T] are ``ValueError``s naming the argument.
    """

    name = "speed"

    def __init__(self, k: float = 5, lam: float = 0.6, tau: int | str = 700, variant: str = "code",
                 mirror: bool | None = None):
        k = _number("k", k)
        if k < 1:
            raise ValueError(f"k must be >= 1 (probability ratio of t < tau to t >= tau), got {k!r}")
        lam = _number("lam", lam)
        if not 0.5 <= lam <= 1.0:
            raise ValueError(f"lam must lie in [0.5, 1], got {lam!r}")
        if isinstance(tau, str):
            if tau != "auto":
                raise ValueError(f"tau must be an integer in [0, T] or 'auto', got {tau!r}")
        elif isinstance(tau, bool) or not isinstance(tau, (int, np.integer)) and not (
            isinstance(tau, float) and float(tau).is_integer()
        ):
            raise ValueError(f"tau must be an integer in [0, T] or 'auto', got {tau!r}")
        else:
            tau = int(tau)
            if tau < 0:
                raise ValueError(f"tau must lie in [0, T], got {tau!r}")
        if variant not in ("code", "paper"):
            raise ValueError(f"variant must be 'code' or 'paper', got {variant!r}")
        if mirror is not None and not isinstance(mirror, (bool, np.bool_)):
            raise ValueError(f"mirror must be True, False or None, got {mirror!r}")
        self.params = {"k": k, "lam": lam, "tau": tau, "variant": variant, "mirror": mirror}
        self.k, self.lam, self.tau, self.variant = k, lam, tau, variant
        self.mirror = bool(mirror) if mirror is not None else variant == "code"

    def resolve_tau(self, schedule: NoiseSchedule) -> int:
        """τ for this schedule: the int given (checked in [0, T]) or the analysis' value for "auto"."""
        if self.tau == "auto":

            return int(areas(schedule)["tau"])
        if not 0 <= self.tau <= schedule.T:
            raise ValueError(f"tau must lie in [0, T] = [0, {schedule.T}], got {self.tau}")
        return int(self.tau)

    def _probs(self, schedule, step):
        T, tau = schedule.T, self.resolve_tau(schedule)
        p = np.ones(T)
        p[:tau] = self.k
        return p / (self.k * tau + T - tau)

    def _weights(self, schedule, prediction):
        tau = self.resolve_tau(schedule)
        return speed_caw(schedule, self.lam, tau if self.variant == "code" else None)


class SpeeDV1(_EpsWeighting):
    """SpeeD's first public release (SpeeDiT): p_t ∝ tanh(1e6·(∂_t√(1-ᾱ_t) - 1e-4)) + 1.5 (≈2.5 before
    the pivot m, ≈0.5 after: ratio 5), the mirrored half batch, and P2 weights with k = 1, γ = 1
    (w = 1/(1 + SNR) = 1 - ᾱ_t on the ε MSE). For v / x0 the P2 objective is expressed on the
    target's MSE like the "p2" strategy (w_v = ᾱ(1-ᾱ), w_x0 = ᾱ), so speed-v1 equals
    combine(speed-v1 sampling, p2) for every target. ∂_t uses numpy.gradient."""

    name = "speed-v1"
    mirror = True

    def _probs(self, schedule, step):
        g = np.gradient(schedule.numpy("sqrt_one_minus_alphas_cumprod"))
        return np.tanh(1e6 * (g - 1e-4)) + 1.5

    def _weights_eps(self, schedule):
        return 1.0 - schedule.numpy("alphas_cumprod")


# ---------------------------------------------------------------------------- weightings
class P2(_EpsWeighting):
    """P2 weighting (Choi et al. 2022, guided-diffusion's P2 code): w = 1/(k + SNR_t)^γ on the ε MSE,
    uniform sampling. For v / x0 the same objective on the target's MSE (×ᾱ_t, ×SNR_t). k = 0 on a
    zero-terminal-SNR schedule divides by SNR = 0 and is a ``ValueError``."""

    name = "p2"

    def __init__(self, k: float = 1.0, gamma: float = 1.0):
        self.params = {"k": _number("k", k, lo=0.0), "gamma": _number("gamma", gamma, lo=0.0)}

    def _weights_eps(self, schedule):
        k, g = self.params["k"], self.params["gamma"]
        snr = schedule.numpy("snr")
        base = k + snr
        if np.any(base <= 0):
            raise ValueError("p2 with k = 0 divides by SNR, which is 0 on this (zero-terminal-SNR) schedule; use k > 0")
        return base ** (-g)


class MinSNR(Strategy):
    """Min-SNR-γ (Hang et al. 2023): ε: min(SNR, γ)/SNR; v: min(SNR, γ)/(SNR + 1); x0: min(SNR, γ).

    At SNR = 0 (the last step of a zero-terminal-SNR schedule) the ε form is 0/0; we give it 1, its
    limit as SNR → 0 (min(SNR, γ)/SNR = 1 for every SNR < γ), which is also the weight of all
    neighbouring noisy steps. The v and x0 forms are 0 there (finite without a guard)."""

    name = "min-snr"

    def __init__(self, gamma: float = 5.0):
        self.params = {"gamma": _number("gamma", gamma, lo=0.0, lo_open=True)}

    def _weights(self, schedule, prediction):
        g = self.params["gamma"]
        snr = schedule.numpy("snr")
        clipped = np.minimum(snr, g)
        if prediction == "eps":
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(snr > 0, clipped / np.where(snr > 0, snr, 1.0), 1.0)
        if prediction == "v":
            return clipped / (snr + 1.0)
        return clipped


# ---------------------------------------------------------------------------- samplings
def _log_sigma_boundaries(log_sigma: np.ndarray) -> np.ndarray:
    """Boundaries (T+1) of the log-σ cells: -inf, midpoints of neighbours, +inf. An infinite last
    log σ (ᾱ = 0) gets the boundary half the previous gap above the last finite value."""
    ls = log_sigma.copy()
    if not np.isfinite(ls[-1]):
        n = ls.shape[0]
        ls[-1] = ls[-2] + (ls[-2] - ls[-3]) if n >= 3 else ls[-2] + 1.0
    mids = 0.5 * (ls[1:] + ls[:-1])
    return np.concatenate([[-np.inf], mids, [np.inf]])


def _normal_cell_mass(z: np.ndarray) -> np.ndarray:
    """Standard normal mass of the cells [z_i, z_{i+1}) (z increasing), accurate in both tails:
    cells above 0 use the survival function, so tiny upper-tail masses do not round to 0."""
    lo, hi = z[:-1], z[1:]
    upper = lo > 0
    return np.where(upper, ndtr(-lo) - ndtr(-hi), ndtr(hi) - ndtr(lo))


class LogNormal(Strategy):
    """EDM's log-normal noise-level density (Karras et al. 2022) on the discrete steps:
    ln σ ~ N(p_mean, p_std²) with σ_t = √((1-ᾱ_t)/ᾱ_t). Step t gets the normal mass of the log-σ
    interval between the midpoints of its neighbours' ln σ (the first and last cells are open).

    Weight 1 by default (a re-sampling method, as the SpeeD paper compares it). ``edm_weight=True``:
    EDM's λ(σ) = (σ² + σ_d²)/(σ·σ_d)² on the x0 error, expressed for the target: since
    ‖x0 err‖ = σ‖ε err‖, w_ε = λσ² = (σ² + σ_d²)/σ_d²; w_x0 = λ; w_v = w_ε·ᾱ = (σ² + σ_d²)/(σ_d²(1 + σ²)).
    At σ = ∞ (SNR = 0): w_x0 and w_v take their limit 1/σ_d²; w_ε is infinite → ``ValueError``."""

    name = "lognormal"

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, edm_weight: bool = False, sigma_data: float = 0.5):
        if not isinstance(edm_weight, (bool, np.bool_)):
            raise ValueError(f"edm_weight must be True or False, got {edm_weight!r}")
        self.params = {
            "p_mean": _number("p_mean", p_mean),
            "p_std": _number("p_std", p_std, lo=0.0, lo_open=True),
            "edm_weight": bool(edm_weight),
            "sigma_data": _number("sigma_data", sigma_data, lo=0.0, lo_open=True),
        }

    def _probs(self, schedule, step):
        abar = schedule.numpy("alphas_cumprod")
        with np.errstate(divide="ignore"):
            log_sigma = 0.5 * (np.log1p(-abar) - np.log(abar))
        z = (_log_sigma_boundaries(log_sigma) - self.params["p_mean"]) / self.params["p_std"]
        return _normal_cell_mass(z)

    def _weights(self, schedule, prediction):
        T = schedule.T
        if not self.params["edm_weight"]:
            return np.ones(T)
        sd2 = self.params["sigma_data"] ** 2
        abar = schedule.numpy("alphas_cumprod")
        zero = abar == 0.0
        if prediction == "eps" and np.any(zero):
            raise ValueError(
                "lognormal with edm_weight=True and prediction='eps' is infinite where SNR = 0 "
                "(zero-terminal-SNR schedule); use prediction='v' or 'x0'"
            )
        safe = np.where(zero, 0.5, abar)
        s2 = (1.0 - safe) / safe  # σ²
        if prediction == "eps":
            return (s2 + sd2) / sd2
        if prediction == "x0":
            w = (s2 + sd2) / (s2 * sd2)
        else:
            w = (s2 + sd2) / (sd2 * (1.0 + s2))
        return np.where(zero, 1.0 / sd2, w)


class CLTS(Strategy):
    """Curriculum learning of time steps (Xu et al. 2024): at training step s,
    p = λ(s)·N(t; μ, σ) + (1 - λ(s))·U with λ(s) = clip(s/ramp_steps, 0, 1); uniform at s = 0.
    N(t; μ, σ) is the normal density at the integer t, normalised over 0..T-1. Weight 1.

    ``mu=None`` means 0.3·T; ``sigma=None`` means 0.15·T (not published by the authors; our choice:
    μ ± 2σ then spans [0, 0.6T], the acceleration and deceleration areas of a linear schedule,
    where the paper's consistency argument places the steps worth emphasising, while the tail
    keeps every t reachable)."""

    name = "clts"
    dynamic = True

    def __init__(self, mu: float | None = None, sigma: float | None = None, ramp_steps: int = 50000):
        self.params = {
            "mu": None if mu is None else _number("mu", mu),
            "sigma": None if sigma is None else _number("sigma", sigma, lo=0.0, lo_open=True),
            # a whole number of steps >= 1 (0.5 would truncate to 0 and divide by zero in lam)
            "ramp_steps": _whole("ramp_steps", ramp_steps, lo=1),
        }

    def lam(self, step: int) -> float:
        return min(max(step / self.params["ramp_steps"], 0.0), 1.0)

    def _probs(self, schedule, step):
        T = schedule.T
        mu = 0.3 * T if self.params["mu"] is None else self.params["mu"]
        sigma = 0.15 * T if self.params["sigma"] is None else self.params["sigma"]
        t = np.arange(T, dtype=np.float64)
        gauss = np.exp(-0.5 * ((t - mu) / sigma) ** 2)
        if not gauss.sum() > 0:
            raise ValueError(f"clts: the normal N({mu}, {sigma}) has no mass on 0..{T - 1}; check mu and sigma")
        lam = self.lam(step)
        return lam * gauss / gauss.sum() + (1.0 - lam) / T


class LogitNormal(Strategy):
    """SD3's logit-normal sampling on discrete steps: u = sigmoid(n), n ~ N(mean, std²),
    t = ⌊u·T⌋ (clamped). Exact mass of t: Φ of the logit of the cell's ends, (t+1)/T and t/T."""

    name = "logit-normal"

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        self.params = {"mean": _number("mean", mean), "std": _number("std", std, lo=0.0, lo_open=True)}

    def _probs(self, schedule, step):
        T = schedule.T
        u = np.arange(T + 1, dtype=np.float64) / T
        with np.errstate(divide="ignore"):
            logit = np.log(u) - np.log1p(-u)
        return _normal_cell_mass((logit - self.params["mean"]) / self.params["std"])


def _loss_pairs(t, per_sample_losses) -> tuple:
    """(t int64, losses float64) host arrays of one update() call of a loss-learning strategy,
    checked: equal lengths, finite losses."""
    tt = (t.detach().to("cpu", torch.int64).numpy() if isinstance(t, torch.Tensor)
          else np.asarray(t, dtype=np.int64)).reshape(-1)
    ll = (per_sample_losses.detach().to("cpu", torch.float64).numpy() if isinstance(per_sample_losses, torch.Tensor)
          else np.asarray(per_sample_losses, dtype=np.float64)).reshape(-1)
    if tt.shape != ll.shape:
        raise ValueError(f"t and per_sample_losses must have the same length, got {tt.shape[0]} and {ll.shape[0]}")
    if not np.all(np.isfinite(ll)):
        raise ValueError("per_sample_losses must be finite")
    return tt, ll


class Importance(Strategy):
    """Loss-aware importance sampling (improved-diffusion's LossSecondMomentResampler).

    Keeps the last ``history`` losses of every t. Until every t has ``history`` of them, sampling is
    uniform and weights are 1. Then p_t ∝ √mean(loss_t²), mixed: p ← p·(1 - uniform_prob) +
    uniform_prob/T, and the weights are 1/(T·p_t), which keep the loss unbiased:
    Σ_t p_t w_t L_t = mean_t L_t. The weights do not depend on the prediction target.
    State (buffers, counts) is in ``state_dict``. ``update(t, losses)`` is vectorised over the batch
    (a step seen several times in one batch keeps its last ``history`` values, in batch order)."""

    name = "importance"
    dynamic = True

    def __init__(self, history: int = 10, uniform_prob: float = 0.001):
        if isinstance(history, bool) or not isinstance(history, (int, np.integer)) or history < 1:
            raise ValueError(f"history must be a positive integer, got {history!r}")
        self.params = {"history": int(history), "uniform_prob": _number("uniform_prob", uniform_prob, lo=0.0, hi=1.0)}
        self._state_T: int | None = None
        self._state_buf: np.ndarray | None = None  # [T, history], ring buffer
        self._state_count: np.ndarray | None = None  # [T] int64, losses seen (total, not capped)

    def _ensure(self, T: int) -> None:
        if self._state_T is None:
            self._state_T = T
            self._state_buf = np.zeros((T, self.params["history"]), dtype=np.float64)
            self._state_count = np.zeros(T, dtype=np.int64)
        elif self._state_T != T:
            raise ValueError(f"importance strategy holds a history for T = {self._state_T}, not T = {T}")

    def warmed_up(self) -> bool:
        return self._state_count is not None and bool(np.all(self._state_count >= self.params["history"]))

    def update(self, t: Any, per_sample_losses: Any, T: int | None = None) -> None:
        """Record losses. ``T`` is needed only before the first table was built (else inferred)."""
        tt, ll = _loss_pairs(t, per_sample_losses)
        if T is not None:
            self._ensure(int(T))
        if self._state_T is None:
            raise ValueError("importance: call probs()/weights() with the schedule (or pass T=) before update()")
        T = self._state_T
        if tt.size and (tt.min() < 0 or tt.max() >= T):
            raise ValueError(f"t must lie in [0, {T - 1}]")
        if tt.size == 0:
            return
        H = self.params["history"]
        order = np.argsort(tt, kind="stable")
        ts, ls = tt[order], ll[order]
        starts = np.r_[0, np.flatnonzero(np.diff(ts)) + 1]
        group_sizes = np.diff(np.r_[starts, ts.size])
        rank = np.arange(ts.size) - np.repeat(starts, group_sizes)
        size = np.repeat(group_sizes, group_sizes)
        keep = rank >= size - H  # only the last H values of a step in this batch survive
        ts, ls, rank = ts[keep], ls[keep], rank[keep]
        slot = (self._state_count[ts] + rank) % H
        self._state_buf[ts, slot] = ls
        np.add.at(self._state_count, tt, 1)

    def _current(self, T: int) -> np.ndarray:
        self._ensure(T)
        if not self.warmed_up():
            return np.full(T, 1.0 / T)
        p = np.sqrt(np.mean(self._state_buf ** 2, axis=1))
        s = p.sum()
        p = p / s if s > 0 else np.full(T, 1.0 / T)
        u = self.params["uniform_prob"]
        return p * (1.0 - u) + u / T

    def _probs(self, schedule, step):
        return self._current(schedule.T)

    def _weights(self, schedule, prediction):
        p = self._current(schedule.T)
        if not self.warmed_up():
            return np.ones(schedule.T)
        p = p / p.sum()
        if np.any(p <= 0):
            raise ValueError("importance: a step has probability 0 (uniform_prob = 0 and a zero loss history); "
                             "use uniform_prob > 0")
        return 1.0 / (schedule.T * p)

    def state_dict(self) -> dict:
        d = super().state_dict()
        d["T"] = self._state_T
        d["buffer"] = None if self._state_buf is None else torch.from_numpy(self._state_buf.copy())
        d["count"] = None if self._state_count is None else torch.from_numpy(self._state_count.copy())
        return d

    def load_state_dict(self, d: Mapping) -> None:
        super().load_state_dict(d)
        if d.get("T") is None:
            self._state_T = self._state_buf = self._state_count = None
            return
        buf = torch.as_tensor(d["buffer"], dtype=torch.float64).cpu().numpy().copy()
        cnt = torch.as_tensor(d["count"], dtype=torch.int64).cpu().numpy().copy()
        T = int(d["T"])
        if buf.shape != (T, self.params["history"]) or cnt.shape != (T,):
            raise ValueError("importance state_dict has buffers of the wrong shape for its T and history")
        self._state_T, self._state_buf, self._state_count = T, buf, cnt


# ---------------------------------------------------------------------------- combine
class Combined(Strategy):
    """Sampling table (and mirror, pivot) of one strategy, weighting table of another."""

    def __init__(self, sampling: Strategy, weighting: Strategy):
        self.sampling, self.weighting = sampling, weighting
        self.name = f"{sampling.name}+{weighting.name}"
        self.params = {"sampling": dict(sampling.params), "weighting": dict(weighting.params)}
        self.mirror = sampling.mirror
        self.dynamic = sampling.dynamic or weighting.dynamic

    def probs(self, schedule, step=0):
        return self.sampling.probs(schedule, step)

    def weights(self, schedule, prediction="eps"):
        return self.weighting.weights(schedule, prediction)

    def pivot(self, schedule):
        return self.sampling.pivot(schedule)

    def update(self, t, per_sample_losses):
        self.sampling.update(t, per_sample_losses)
        if self.weighting is not self.sampling:
            self.weighting.update(t, per_sample_losses)

    def state_dict(self):
        return {"name": self.name, "sampling": self.sampling.state_dict(), "weighting": self.weighting.state_dict()}

    def load_state_dict(self, d):
        if not isinstance(d, Mapping) or d.get("name") != self.name:
            raise ValueError(f"state_dict is for strategy {d.get('name') if isinstance(d, Mapping) else d!r}, not {self.name!r}")
        self.sampling.load_state_dict(d["sampling"])
        if self.weighting is not self.sampling:
            self.weighting.load_state_dict(d["weighting"])

    def __repr__(self):
        return f"combine({self.sampling!r}, {self.weighting!r})"


# ---------------------------------------------------------------------------- registry
_REGISTRY: Dict[str, Callable[..., Strategy]] = {}


def register(name: str, factory: Callable[..., Strategy]) -> None:
    """Add a strategy factory under ``name`` (it must accept the parameters as keywords)."""
    if not isinstance(name, str) or not name or "+" in name:
        raise ValueError(f"name must be a non-empty string without '+', got {name!r}")
    _REGISTRY[name] = factory


for _cls in (Uniform, SpeeD, P2, MinSNR, LogNormal, CLTS, LogitNormal, Importance, SpeeDV1):
    register(_cls.name, _cls)


def names() -> list:
    """The registered strategy names."""
    return list(_REGISTRY)


def get(name: str, **params: Any) -> Strategy:
    """A new strategy by name with its parameters. Unknown name or parameter → ``ValueError``
    (listing the known ones). ``"a+b"`` (no parameters) is ``combine(get("a"), get("b"))``."""
    if isinstance(name, Strategy):
        if params:
            raise ValueError("params cannot be given with a Strategy object")
        return name
    if not isinstance(name, str):
        raise ValueError(f"name must be a strategy name (str), got {type(name).__name__}")
    if "+" in name:
        a, _, b = name.partition("+")
        if params:
            raise ValueError(f"a combined name ({name!r}) takes no params; use combine(get(...), get(...))")
        return combine(a, b)
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(names())}")
    factory = _REGISTRY[name]
    sig = inspect.signature(factory)
    if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        accepted = [p for p in sig.parameters if p != "self"]
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ValueError(
                f"strategy {name!r} has no parameter {', '.join(unknown)}; "
                f"its parameters: {', '.join(accepted) if accepted else '(none)'}"
            )
    return factory(**params)


def combine(sampling: Strategy | str, weighting: Strategy | str) -> Strategy:
    """A strategy with the sampling table (and mirror) of ``sampling`` and the weights of ``weighting``
    (each a Strategy or a registered name), e.g. ``combine("speed", "p2")``."""
    s = get(sampling) if isinstance(sampling, str) else sampling
    w = get(weighting) if isinstance(weighting, str) else weighting
    for arg, v in (("sampling", s), ("weighting", w)):
        if not isinstance(v, Strategy):
            raise ValueError(f"{arg} must be a Strategy or a strategy name, got {type(v).__name__}")
    return Combined(s, w)


# ---------------------------------------------------------------------------- adaptive
class Adaptive(Strategy):
    """Learning-progress sampling: more draws where the loss is still falling, set online.

    The T steps are cut into ``buckets`` equal-width buckets (the last one takes the remainder;
    ``min(buckets, T)`` of them). For every bucket b the strategy keeps two exponential moving
    averages of the unweighted per-sample loss it is fed, one fast and one slow, with time
    constants ``fast_steps`` and ``slow_steps`` counted in *training steps* (one ``update`` call is
    one step): a bucket seen after Δ steps moves its average by 1 - exp(-Δ/τ) towards the mean
    loss of its samples in that step, so a rarely drawn bucket is not made to look slower. For a
    loss falling at a steady rate the slow average lags the fast one by about rate·(τ_slow - τ_fast),
    so the learning progress of a bucket is its relative fall

        LP_b = max(0, slow_b - fast_b) / slow_b      (``relative=False``: max(0, slow_b - fast_b))

    The relative form makes buckets with very different loss levels comparable (ε-prediction losses
    span orders of magnitude over t); in the first few hundred steps of a run it favours large t, where
    the ε loss collapses from its initial level fastest (unet-tiny on digits, 300 steps: 37 % of the
    mass at t ≥ 700). The absolute form favours buckets whose loss falls by the most in loss units,
    usually the small t of an ε-prediction model. Which is better is what the regime study measures;
    the default is the relative form, chosen before any study run. The sampling table is a mixture
    with uniform at bucket level:

        p_b = (1 - mix)·LP_b / Σ LP + mix / B        (uniform when Σ LP = 0),

    spread evenly over the steps of each bucket (p_t = p_b·|bucket|/T-normalised, see ``_probs``).
    The ``mix`` share keeps every bucket drawn, so its progress is still measured and a bucket that
    starts falling again is found. The table is uniform until ``warmup_steps`` updates have been made
    and every bucket has been seen at least once (``warmup_steps=None``: ``slow_steps``, so the slow
    average has settled), and is recomputed every ``every`` updates only (between two recomputations
    the device table, which ``DiffusionLoss.refresh_tables`` copies in place, stays fixed).

    Unbiasedness: ``unbiased=False`` (default) uses weight 1, a re-sampling strategy like SpeeD's
    sampling, CLTS or Kim et al.'s adaptive sampler: the objective itself moves towards the buckets
    that are still improving. ``unbiased=True`` uses importance weights w_t = 1/(T·p_t), so the
    expected loss stays the uniform one (Σ_t p_t·w_t·L_t = mean_t L_t) and only the variance of the
    estimate changes, as ``importance`` does. Either way the weights do not depend on the target.

    It learns from the losses ``DiffusionLoss`` feeds it (unweighted, so the weights do not feed
    back into what it measures); a distributed trainer feeds every rank the gathered (t, loss) of
    all ranks in rank order, so every rank computes the same table. All state (averages, last-seen
    steps, counters, the current table) is in ``state_dict``: a resumed run continues with the
    identical table. The defaults are a first reasonable choice, not tuned on any quality metric.
    Non-finite losses are a ``ValueError``.
    """

    name = "adaptive"
    dynamic = True

    def __init__(self, buckets: int = 20, fast_steps: float = 50.0, slow_steps: float = 250.0, mix: float = 0.5,
                 warmup_steps: int | None = None, every: int = 10, unbiased: bool = False,
                 relative: bool = True):
        for arg, v in (("buckets", buckets), ("every", every)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{arg} must be a positive integer, got {v!r}")
        fast = _number("fast_steps", fast_steps, lo=0.0, lo_open=True)
        slow = _number("slow_steps", slow_steps, lo=0.0, lo_open=True)
        if not slow > fast:
            raise ValueError(f"slow_steps must be larger than fast_steps, got slow_steps={slow_steps!r}, "
                             f"fast_steps={fast_steps!r}")
        if warmup_steps is not None and (isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, np.integer))
                                         or warmup_steps < 0):
            raise ValueError(f"warmup_steps must be a non-negative integer or None, got {warmup_steps!r}")
        for arg, v in (("unbiased", unbiased), ("relative", relative)):
            if not isinstance(v, (bool, np.bool_)):
                raise ValueError(f"{arg} must be True or False, got {v!r}")
        self.params = {"buckets": int(buckets), "fast_steps": fast, "slow_steps": slow,
                       "mix": _number("mix", mix, lo=0.0, hi=1.0),
                       "warmup_steps": None if warmup_steps is None else int(warmup_steps),
                       "every": int(every), "unbiased": bool(unbiased), "relative": bool(relative)}
        self._state_T: int | None = None

    # state ------------------------------------------------------------------------------
    def _ensure(self, T: int) -> None:
        if self._state_T is None:
            B = min(self.params["buckets"], T)
            self._state_T = T
            self._edges = np.linspace(0, T, B + 1).round().astype(np.int64)
            self._bucket_of = np.searchsorted(self._edges, np.arange(T), side="right") - 1
            self._fast = np.zeros(B)
            self._slow = np.zeros(B)
            self._last = np.zeros(B, dtype=np.int64)  # update index at which each bucket was last seen
            self._seen = np.zeros(B, dtype=np.int64)  # steps in which each bucket had samples
            self._updates = 0
            self._pb = np.full(B, 1.0 / B)  # the current bucket-level table
        elif self._state_T != T:
            raise ValueError(f"adaptive strategy holds statistics for T = {self._state_T}, not T = {T}")

    def warmed_up(self) -> bool:
        if self._state_T is None:
            return False
        w = self.params["warmup_steps"]
        w = int(math.ceil(self.params["slow_steps"])) if w is None else w
        return self._updates >= w and bool(np.all(self._seen > 0))

    def progress(self) -> np.ndarray:
        """LP_b per bucket (float64 [B]); zeros before the first update."""
        if self._state_T is None:
            raise ValueError("adaptive: no statistics yet (build a table or update with T= first)")
        fall = np.maximum(self._slow - self._fast, 0.0)
        if not self.params["relative"]:
            return np.where(self._seen > 0, fall, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            lp = np.where(self._slow > 0, fall / self._slow, 0.0)
        return np.where(self._seen > 0, lp, 0.0)

    def bucket_edges(self) -> np.ndarray:
        """Bucket b holds the steps edges[b] .. edges[b+1] - 1."""
        if self._state_T is None:
            raise ValueError("adaptive: no statistics yet (build a table or update with T= first)")
        return self._edges.copy()

    def _recompute(self) -> None:
        B = self._fast.shape[0]
        if not self.warmed_up():
            self._pb = np.full(B, 1.0 / B)
            return
        lp = self.progress()
        s = lp.sum()
        mix = self.params["mix"]
        self._pb = (1.0 - mix) * lp / s + mix / B if s > 0 else np.full(B, 1.0 / B)

    def update(self, t: Any, per_sample_losses: Any, T: int | None = None) -> None:
        """One training step's (t, unweighted loss) pairs (all ranks' in a distributed run).
        ``T`` is needed only before the first table was built."""
        tt, ll = _loss_pairs(t, per_sample_losses)
        if T is not None:
            self._ensure(int(T))
        if self._state_T is None:
            raise ValueError("adaptive: call probs()/weights() with the schedule (or pass T=) before update()")
        if tt.size and (tt.min() < 0 or tt.max() >= self._state_T):
            raise ValueError(f"t must lie in [0, {self._state_T - 1}]")
        self._updates += 1
        if tt.size:
            B = self._fast.shape[0]
            b = self._bucket_of[tt]
            n = np.bincount(b, minlength=B)
            hit = n > 0
            mean = np.bincount(b, weights=ll, minlength=B)[hit] / n[hit]
            first = hit & (self._seen == 0)
            dt = (self._updates - self._last[hit]).astype(np.float64)
            for ema, tau in ((self._fast, self.params["fast_steps"]), (self._slow, self.params["slow_steps"])):
                a = -np.expm1(-dt / tau)  # 1 - exp(-Δ/τ): the step-time EMA for irregular observations
                ema[hit] += a * (mean - ema[hit])
                ema[first] = mean[first[hit]]  # first observation: start both averages at it
            self._last[hit] = self._updates
            self._seen[hit] += 1
        if self._updates % self.params["every"] == 0:
            self._recompute()

    def state_dict(self) -> dict:
        d = super().state_dict()
        d["T"] = self._state_T
        if self._state_T is not None:
            d.update(fast=torch.from_numpy(self._fast.copy()), slow=torch.from_numpy(self._slow.copy()),
                     last=torch.from_numpy(self._last.copy()), seen=torch.from_numpy(self._seen.copy()),
                     updates=int(self._updates), table=torch.from_numpy(self._pb.copy()))
        return d

    def load_state_dict(self, d: Mapping) -> None:
        super().load_state_dict(d)
        self._state_T = None
        if d.get("T") is None:
            return
        self._ensure(int(d["T"]))
        B = self._fast.shape[0]
        arrs = {k: torch.as_tensor(d[k]).cpu().numpy().copy() for k in ("fast", "slow", "last", "seen", "table")}
        if any(a.shape != (B,) for a in arrs.values()):
            raise ValueError(f"adaptive state_dict has arrays of the wrong shape for {B} buckets")
        self._fast, self._slow = arrs["fast"].astype(np.float64), arrs["slow"].astype(np.float64)
        self._last, self._seen = arrs["last"].astype(np.int64), arrs["seen"].astype(np.int64)
        self._pb = arrs["table"].astype(np.float64)
        self._updates = int(d["updates"])

    # tables -----------------------------------------------------------------------------
    def _probs(self, schedule, step):
        self._ensure(schedule.T)
        sizes = np.diff(self._edges)
        return (self._pb / sizes)[self._bucket_of]

    def _weights(self, schedule, prediction):
        if not self.params["unbiased"]:
            return np.ones(schedule.T)
        p = _normalise(self._probs(schedule, 0), self.name)
        if np.any(p <= 0):
            raise ValueError("adaptive: unbiased=True needs every step drawable; use mix > 0")
        return 1.0 / (schedule.T * p)


register(Adaptive.name, Adaptive)
