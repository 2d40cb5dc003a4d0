"""The diffusion process along t: its increments and the three areas of SpeeD (Wang et al. 2024,
Section 2 and Theorem 1).

The process increment between neighbouring steps, δ_t = x_{t+1} - x_t given x0, is treated as
the paper's Theorem 1 does: a Gaussian increment independent of x_t, so that the marginal
variances add up, Var(x_{t+1}) = Var(x_t) + Var(δ_t). Then

    δ_t ~ N((√ᾱ_{t+1} - √ᾱ_t)·x0, (ᾱ_t - ᾱ_{t+1})·I),

the mean coefficient is the step of √ᾱ and the variance is the step of the process variance
1 - ᾱ_t: the increment variance *is* the rate of change of the noise variance. (The one-step
Markov kernel x_{t+1} = √α_{t+1}·x_t + √β_{t+1}·ε gives another variance, dominated by β_{t+1}
and increasing to the end, with no interior peak: it does not reproduce the paper's areas; it is
available as ``increment_variance(schedule, kind="markov")``.)

Areas along t (half-open intervals):

- acceleration [0, t_ad): the increment variance grows;
- deceleration [t_ad, τ): it shrinks;
- convergence [τ, T): the process has nearly reached pure noise; increments are tiny.

``t_ad`` is the peak of ∂_t(1 - ᾱ_t), computed with numpy.gradient (central differences), which is
the increment variance up to the half-step shift and exactly the g of SpeeD's change-aware
weighting, so the CAW weight peaks at t_ad: 219 on the linear schedule (the forward difference
ᾱ_t - ᾱ_{t+1} peaks at 218, the increment from 218 to 219).

``tau`` (τ): the rule is 1 + the first t at which the rate of change of the noise standard
deviation per unit of *normalised* time, T·∂_t√(1 - ᾱ_t) (numpy.gradient), falls below 0.05.
On T = 1000 this is the official code's ∂_t√(1 - ᾱ_t) < 5e-5 and gives exactly 700 on the linear
schedule. Why this rule: √(1 - ᾱ_t) runs from ≈0 to ≈1 on every schedule, so a threshold on its
derivative with respect to t/T ∈ [0, 1] is dimensionless and independent of T (linear β with
DiT's 1000/T scaling gives τ ≈ 0.7·T for T = 250 and T = 4000 alike). A threshold relative to the
derivative's peak is not: that peak sits at t = 0 and is set by the √ singularity and β_start,
so the same relative threshold moves τ with T and β_start. Values (T = 1000): linear t_ad 219,
τ 700, pivot 642; scaled_linear t_ad 313, τ 944, pivot 866; cosine t_ad 495, τ 980, pivot 959.
The cosine and scaled-linear schedules reach pure noise later, so their convergence area is
short: SpeeD's τ = 700 default is a linear-schedule number, use ``tau="auto"`` elsewhere.

``pivot``: the official SpeeD mirror pivot, 1 + the first t with ∂_t√(1 - ᾱ_t) < 1e-4 (per step at
T = 1000; 0.1 per unit of normalised time in general), clamped to [0, T-1]: 642 on linear.

Every curve is returned as a float64 numpy array.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from speed_kernels.schedules import NoiseSchedule

__all__ = [
    "noise_std",
    "noise_std_rate",
    "marginal_variance",
    "marginal_variance_rate",
    "increment_mean_coef",
    "increment_variance",
    "increment_mean_coef_rate",
    "increment_variance_rate",
    "mirror_pivot",
    "areas",
    "area_shares",
    "TAU_THRESHOLD",
    "PIVOT_THRESHOLD",
    "AREA_NAMES",
]

#: τ rule: T·∂_t√(1-ᾱ_t) below this (per unit of normalised time) starts the convergence area.
TAU_THRESHOLD = 0.05
#: Mirror pivot rule of the official code (1e-4 per step at T = 1000), per unit of normalised time.
PIVOT_THRESHOLD = 0.1

AREA_NAMES = ("acceleration", "deceleration", "convergence")


def _check(schedule: Any) -> NoiseSchedule:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    return schedule


# ---------------------------------------------------------------------------- curves
def noise_std(schedule: NoiseSchedule) -> np.ndarray:
    """√(1 - ᾱ_t), [T]."""
    return _check(schedule).numpy("sqrt_one_minus_alphas_cumprod")


def noise_std_rate(schedule: NoiseSchedule, normalized: bool = False) -> np.ndarray:
    """∂_t√(1 - ᾱ_t) by numpy.gradient, [T]; per unit of t/T (×T) when ``normalized``."""
    g = np.gradient(noise_std(schedule))
    return g * schedule.T if normalized else g


def marginal_variance(schedule: NoiseSchedule) -> np.ndarray:
    """Var(x_t | x0) per element: 1 - ᾱ_t, [T]."""
    return 1.0 - _check(schedule).numpy("alphas_cumprod")


def marginal_variance_rate(schedule: NoiseSchedule) -> np.ndarray:
    """∂_t(1 - ᾱ_t) by numpy.gradient, [T] (SpeeD's CAW g; its peak is t_ad)."""
    return np.gradient(marginal_variance(schedule))


def increment_mean_coef(schedule: NoiseSchedule) -> np.ndarray:
    """Mean coefficient of δ_t = x_{t+1} - x_t given x0: √ᾱ_{t+1} - √ᾱ_t (≤ 0), [T-1] for t = 0..T-2."""
    s = _check(schedule).numpy("sqrt_alphas_cumprod")
    return s[1:] - s[:-1]


def increment_variance(schedule: NoiseSchedule, kind: str = "additive") -> np.ndarray:
    """Variance of δ_t = x_{t+1} - x_t given x0, [T-1] for t = 0..T-2.

    ``kind="additive"`` (Theorem 1, the paper's analysis): ᾱ_t - ᾱ_{t+1}.
    ``kind="markov"`` (the one-step chain x_{t+1} = √α_{t+1}x_t + √β_{t+1}ε):
    (1 - √α_{t+1})²(1 - ᾱ_t) + β_{t+1}."""
    abar = _check(schedule).numpy("alphas_cumprod")
    if kind == "additive":
        return abar[:-1] - abar[1:]
    if kind == "markov":
        a_next = schedule.numpy("alphas")[1:]
        return (1.0 - np.sqrt(a_next)) ** 2 * (1.0 - abar[:-1]) + (1.0 - a_next)
    raise ValueError(f"kind must be 'additive' or 'markov', got {kind!r}")


def increment_mean_coef_rate(schedule: NoiseSchedule) -> np.ndarray:
    """∂_t of :func:`increment_mean_coef` (numpy.gradient), [T-1]."""
    return np.gradient(increment_mean_coef(schedule))


def increment_variance_rate(schedule: NoiseSchedule, kind: str = "additive") -> np.ndarray:
    """∂_t of :func:`increment_variance` (numpy.gradient), [T-1]; crosses 0 at t_ad."""
    return np.gradient(increment_variance(schedule, kind))


# ---------------------------------------------------------------------------- areas
def _first_below(rate: np.ndarray, thr: float) -> Optional[int]:
    below = np.flatnonzero(rate < thr)
    return int(below[0]) if below.size else None


def mirror_pivot(schedule: NoiseSchedule, threshold: float = PIVOT_THRESHOLD) -> int:
    """The official SpeeD mirror pivot: 1 + first t with T·∂_t√(1-ᾱ_t) < threshold (i.e.
    ∂_t√(1-ᾱ_t) < 1e-4 at T = 1000), clamped to [0, T-1] so that |t - m| stays a valid step;
    T-1 if the rate never falls below the threshold. 642 on the linear schedule."""
    first = _first_below(noise_std_rate(schedule, normalized=True), threshold)
    T = schedule.T
    return T - 1 if first is None else min(first + 1, T - 1)


def areas(schedule: NoiseSchedule, tau_threshold: float = TAU_THRESHOLD,
          pivot_threshold: float = PIVOT_THRESHOLD) -> Dict[str, Any]:
    """The three areas of the paper for this schedule (see the module docstring for the rules).

    Returns ``{"T", "t_ad", "tau", "pivot", "acceleration": [0, t_ad], "deceleration": [t_ad, tau],
    "convergence": [tau, T], "rule": {...}}`` (intervals half-open). τ = T (empty convergence area)
    if the rate never falls below the threshold."""
    _check(schedule)
    T = schedule.T
    t_ad = int(np.argmax(marginal_variance_rate(schedule)))
    first = _first_below(noise_std_rate(schedule, normalized=True), tau_threshold)
    tau = T if first is None else min(first + 1, T)
    return {
        "schedule": schedule.name,
        "T": T,
        "t_ad": t_ad,
        "tau": int(tau),
        "pivot": mirror_pivot(schedule, pivot_threshold),
        "acceleration": [0, t_ad],
        "deceleration": [t_ad, int(tau)],
        "convergence": [int(tau), T],
        "rule": {
            "t_ad": "argmax_t numpy.gradient(1 - alphas_cumprod)",
            "tau": "1 + first t with T * numpy.gradient(sqrt(1 - alphas_cumprod)) < tau_threshold",
            "tau_threshold": float(tau_threshold),
            "pivot": "1 + first t with T * numpy.gradient(sqrt(1 - alphas_cumprod)) < pivot_threshold",
            "pivot_threshold": float(pivot_threshold),
        },
    }


def area_shares(probs: Any, area: Dict[str, Any]) -> Dict[str, float]:
    """Probability mass of ``probs`` in each area."""
    p = np.asarray(probs, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(p)])
    t_ad, tau, T = area["t_ad"], area["tau"], area["T"]
    lo = min(t_ad, tau)
    return {
        "acceleration": float(c[lo] - c[0]),
        "deceleration": float(c[tau] - c[lo]),
        "convergence": float(c[T] - c[tau]),
    }
