"""Fixed strategies: tables that depend on the schedule only (SpeeD and its first release, P2,
Min-SNR, EDM log-normal, CLTS, SD3 logit-normal)."""
from __future__ import annotations


import numpy as np
from scipy.special import ndtr

from speed_kernels.process import areas
from speed_kernels.schedules import NoiseSchedule
from speed_kernels.strategies.base import (Strategy, _EpsWeighting, _number, _whole)


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
