"""Time-step strategies for flow matching: densities over sigma in [0, 1] and loss weightings.

Convention (diffusers' FlowMatch, the SD3 paper's t): x_t = (1 - sigma) x0 + sigma eps, sigma = 1
is pure noise, signal-to-noise ratio SNR(sigma) = ((1 - sigma) / sigma)^2, log-SNR
lambda = 2 ln((1 - sigma) / sigma). SiT's t is 1 - sigma (see speed_kernels.flow.sit_to_sigma).

A strategy is a sampling density and a weighting:

* a **density** has ``pdf(sigma)``, ``cdf(sigma)`` and ``icdf(u)`` (float64 numpy, closed forms
  where they exist, otherwise scipy's special functions or a bisection on the CDF). Every density
  can be shifted (``shift=s``: sigma' = s sigma / (1 + (s - 1) sigma), the
  FlowMatchEulerDiscreteScheduler shift, applied to the drawn sigma) and truncated to a sigma range
  (``clamp=(lo, hi)``: the density restricted to [lo, hi] and renormalised; no point masses).
  The clamp is on the final (shifted) sigma.
* a **weighting** is ``weight(sigma, prediction)``: the factor on the per-sample MSE of what the
  model predicts ("v": target eps - x0; "x0"; "eps"). ``none``, ``sigma_sqrt`` and ``cosmap`` are
  diffusers' ``compute_loss_weighting_for_sd3`` and multiply whatever MSE is trained (as the
  diffusers scripts do; sigma_sqrt with prediction "x0" is SD3's preconditioned loss).
  ``min_snr`` and ``p2`` are defined on one objective and converted per target with
  ||x0_hat - x0||^2 = sigma^2 ||v_hat - v||^2 = ||eps_hat - eps||^2 / SNR (fixed x_t):
  Min-SNR-gamma is min(SNR, gamma) on the x0 error, so w_v = min((1 - sigma)^2, gamma sigma^2),
  w_x0 = min(SNR, gamma), w_eps = min(1, gamma / SNR); P2 is (k + SNR)^-gamma on the eps error,
  so w_eps = (k + SNR)^-gamma, w_v = (1 - sigma)^2 w_eps, w_x0 = SNR w_eps.

Registry: ``get(name, **params)``; ``name`` is a density ("logit_normal"), a weighting
("min_snr", sampled uniformly), "speed" (SpeeD for flow: its sampling and its weighting), or a
"sampling+weighting" pair ("logit_normal+min_snr"). Parameters go to whichever part accepts them
(``shift`` and ``clamp`` to the density). A lone "cosmap" is the SD3 paper's CosMap *sampling*;
diffusers' ``weighting_scheme="cosmap"`` is uniform sampling with the cosmap weight, i.e.
"uniform+cosmap" (see :func:`from_diffusers`).

SpeeD for flow (derivation in docs/flow.md): the process increment is measured on x_t scaled to
unit variance (the variance-preserving twin of the flow path): its noise level is
s(sigma) = sigma / sqrt((1 - sigma)^2 d^2 + sigma^2) (d = data std), and the increment is
g(sigma) = ds/dsigma = d^2 (1 - sigma) / ((1 - sigma)^2 d^2 + sigma^2)^(3/2). It vanishes at
sigma = 1: the convergence area is the pure-noise end. tau (in sigma) is where g falls below the
same fraction of its maximum as the official tau = 700 on DDPM's linear schedule; sampling is
k/Z below tau, 1/Z above; the change-aware weight is (1 - lam) + (2 lam - 1) g_hat below tau and
1 above (g_hat = g / max g), as the official code.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
from scipy import special

__all__ = [
    "Density", "Weighting", "FlowStrategy", "get", "names", "densities", "weightings",
    "from_diffusers", "shift_sigma", "unshift_sigma", "snr", "speed_increment", "speed_tau",
    "PREDICTIONS",
]

PREDICTIONS = ("v", "x0", "eps")
_TINY = 1e-300


def _num(name: str, value: Any, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v}")
    return v


def _arr(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def shift_sigma(sigma, shift: float) -> np.ndarray:
    """sigma' = s sigma / (1 + (s - 1) sigma) (monotone, fixes 0 and 1)."""
    s = _arr(sigma)
    return shift * s / (1.0 + (shift - 1.0) * s)


def unshift_sigma(sigma, shift: float) -> np.ndarray:
    """Inverse of :func:`shift_sigma`: sigma = sigma' / (s - (s - 1) sigma')."""
    s = _arr(sigma)
    return s / (shift - (shift - 1.0) * s)


def snr(sigma) -> np.ndarray:
    """((1 - sigma) / sigma)^2 (inf at sigma = 0, 0 at sigma = 1)."""
    s = _arr(sigma)
    with np.errstate(divide="ignore"):
        return ((1.0 - s) / s) ** 2


# ------------------------------------------------------------------------------- densities
class Density:
    """A distribution of sigma on [0, 1]. Subclasses give pdf/cdf and, when they can, icdf."""

    name = "density"

    def __init__(self, **params):
        self.params = params

    def pdf(self, sigma) -> np.ndarray:
        raise NotImplementedError

    def cdf(self, sigma) -> np.ndarray:
        raise NotImplementedError

    def icdf(self, u) -> np.ndarray:
        """Quantile by bisection on the CDF (60 halvings: float64 resolution on [0, 1])."""
        u = _arr(u)
        lo = np.zeros_like(u)
        hi = np.ones_like(u)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            below = self.cdf(mid) < u
            lo = np.where(below, mid, lo)
            hi = np.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def __repr__(self) -> str:
        ps = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name}({ps})"


class UniformDensity(Density):
    """sigma ~ U(0, 1)."""

    name = "uniform"

    def pdf(self, sigma):
        s = _arr(sigma)
        return np.where((s >= 0) & (s <= 1), 1.0, 0.0)

    def cdf(self, sigma):
        return np.clip(_arr(sigma), 0.0, 1.0)

    def icdf(self, u):
        return np.clip(_arr(u), 0.0, 1.0)


class LogitNormal(Density):
    """logit(sigma) ~ N(mean, std^2) (SD3 paper; mean > 0 favours noise). diffusers' scripts draw
    u = sigmoid(N(m, s)) and take sigma ~ 1 - u: that is mean = -m here (see from_diffusers)."""

    name = "logit_normal"

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        super().__init__(mean=_num("mean", mean), std=_num("std", std, lo=0, lo_open=True))
        self.mean, self.std = self.params["mean"], self.params["std"]

    def _z(self, s):
        with np.errstate(divide="ignore"):
            return (np.log(s) - np.log1p(-s) - self.mean) / self.std

    def pdf(self, sigma):
        s = np.clip(_arr(sigma), 0.0, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = self._z(s)
            p = np.exp(-0.5 * z * z) / (self.std * math.sqrt(2 * math.pi) * s * (1.0 - s))
        return np.where((s > 0) & (s < 1), p, 0.0)

    def cdf(self, sigma):
        return special.ndtr(self._z(np.clip(_arr(sigma), 0.0, 1.0)))

    def icdf(self, u):
        return special.expit(self.mean + self.std * special.ndtri(_arr(u)))


class EDMLogNormal(LogitNormal):
    """EDM's ln sigma_edm ~ N(p_mean, p_std^2) in sigma space. With x_flow = (1 - sigma)(x0 +
    sigma_edm eps) at equal SNR, sigma_edm = sigma / (1 - sigma), so ln sigma_edm = logit(sigma):
    exactly a logit-normal(p_mean, p_std). Defaults: EDM (-1.2, 1.2); EDM2 -0.4/1.0 at 512 px."""

    name = "edm_lognormal"

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        super().__init__(mean=p_mean, std=p_std)
        self.params = {"p_mean": self.mean, "p_std": self.std}


def _mode_h(u, scale):
    # sigma = 1 - f_mode(u) = u + scale (u - sin^2(pi u / 2)); same law as f_mode(u) (symmetric).
    return u + scale * (u - np.sin(0.5 * math.pi * u) ** 2)


class Mode(Density):
    """SD3's mode sampling: sigma = f(u), f(u) = 1 - u - scale (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1).
    The law is symmetric about 1/2, so f and 1 - f agree. Monotone for -1 <= scale <= 2/(pi - 2)."""

    name = "mode"

    def __init__(self, scale: float = 1.29):
        super().__init__(scale=_num("scale", scale, lo=-1.0, hi=2.0 / (math.pi - 2.0)))
        self.scale = self.params["scale"]

    def icdf(self, u):
        return np.clip(_mode_h(_arr(u), self.scale), 0.0, 1.0)

    def _hprime(self, u):
        return 1.0 + self.scale * (1.0 - 0.5 * math.pi * np.sin(math.pi * u))

    def cdf(self, sigma):
        s = np.clip(_arr(sigma), 0.0, 1.0)
        lo, hi = np.zeros_like(s), np.ones_like(s)
        for _ in range(60):  # h is increasing: invert by bisection
            mid = 0.5 * (lo + hi)
            below = _mode_h(mid, self.scale) < s
            lo = np.where(below, mid, lo)
            hi = np.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def pdf(self, sigma):
        s = _arr(sigma)
        with np.errstate(divide="ignore"):
            p = 1.0 / self._hprime(self.cdf(s))
        return np.where((s >= 0) & (s <= 1), p, 0.0)


class CosMap(Density):
    """SD3's CosMap: pdf 2 / (pi (1 - 2 sigma + 2 sigma^2)), CDF (2/pi) atan(sigma / (1 - sigma))."""

    name = "cosmap"

    def pdf(self, sigma):
        s = _arr(sigma)
        return np.where((s >= 0) & (s <= 1), 2.0 / (math.pi * (1.0 - 2.0 * s + 2.0 * s * s)), 0.0)

    def cdf(self, sigma):
        s = np.clip(_arr(sigma), 0.0, 1.0)
        return (2.0 / math.pi) * np.arctan2(s, 1.0 - s)

    def icdf(self, u):
        # sigma = 1 - 1 / (tan(pi u / 2) + 1) = sin / (sin + cos), stable at u -> 1
        a = 0.5 * math.pi * _arr(u)
        return np.sin(a) / (np.sin(a) + np.cos(a))


class LaplaceLogSNR(Density):
    """Hang et al.: log-SNR lambda ~ Laplace(mu, b) (lambda = 2 ln((1 - sigma) / sigma)), so
    sigma = sigmoid(-lambda / 2). Defaults mu = 0, b = 0.5 (their ImageNet setting)."""

    name = "laplace"

    def __init__(self, mu: float = 0.0, b: float = 0.5):
        super().__init__(mu=_num("mu", mu), b=_num("b", b, lo=0, lo_open=True))
        self.mu, self.b = self.params["mu"], self.params["b"]

    def _lam(self, s):
        with np.errstate(divide="ignore"):
            return 2.0 * (np.log1p(-s) - np.log(s))

    def _lap_cdf(self, lam):
        z = (lam - self.mu) / self.b
        return np.where(z < 0, 0.5 * np.exp(np.minimum(z, 0.0)), 1.0 - 0.5 * np.exp(-np.maximum(z, 0.0)))

    def cdf(self, sigma):
        s = np.clip(_arr(sigma), 0.0, 1.0)
        return 1.0 - self._lap_cdf(self._lam(s))  # sigma <= s  <=>  lambda >= lambda(s)

    def pdf(self, sigma):
        s = _arr(sigma)
        inside = (s > 0) & (s < 1)
        sc = np.where(inside, s, 0.5)
        lam = self._lam(sc)
        dens_lam = np.exp(-np.abs(lam - self.mu) / self.b) / (2.0 * self.b)
        return np.where(inside, dens_lam * 2.0 / (sc * (1.0 - sc)), 0.0)  # |dlambda/dsigma|

    def icdf(self, u):
        p = 1.0 - _arr(u)  # quantile of lambda at 1 - u (+-inf at the ends: sigma 0 and 1)
        with np.errstate(divide="ignore"):
            lam = self.mu - self.b * np.sign(p - 0.5) * np.log1p(-2.0 * np.abs(p - 0.5))
        return special.expit(-0.5 * lam)


class Beta(Density):
    """sigma ~ Beta(a, b) (B-TTDM; OneTrainer suggests a = 0.8, b = 1)."""

    name = "beta"

    def __init__(self, a: float = 0.8, b: float = 1.0):
        super().__init__(a=_num("a", a, lo=0, lo_open=True), b=_num("b", b, lo=0, lo_open=True))
        self.a, self.b = self.params["a"], self.params["b"]

    def pdf(self, sigma):
        s = _arr(sigma)
        inside = (s > 0) & (s < 1)
        sc = np.where(inside, s, 0.5)
        logp = (self.a - 1) * np.log(sc) + (self.b - 1) * np.log1p(-sc) - special.betaln(self.a, self.b)
        return np.where(inside, np.exp(logp), 0.0)

    def cdf(self, sigma):
        return special.betainc(self.a, self.b, np.clip(_arr(sigma), 0.0, 1.0))

    def icdf(self, u):
        return special.betaincinv(self.a, self.b, _arr(u))


def speed_increment(sigma, data_std: float = 1.0) -> np.ndarray:
    """g(sigma) = d s / d sigma of the unit-variance twin's noise level
    s = sigma / sqrt((1 - sigma)^2 d^2 + sigma^2): d^2 (1 - sigma) / ((1 - sigma)^2 d^2 + sigma^2)^1.5."""
    s = _arr(sigma)
    d2 = data_std * data_std
    return d2 * (1.0 - s) / ((1.0 - s) ** 2 * d2 + s * s) ** 1.5


def _ddpm_relative_threshold() -> float:
    """The official tau = 700 criterion (d_t sqrt(1 - ab_t) < 5e-5 per step, T = 1000, linear
    schedule) as a fraction of the maximum of that derivative."""
    betas = np.linspace(1e-4, 0.02, 1000)
    g = np.gradient(np.sqrt(1.0 - np.cumprod(1.0 - betas)))
    return 5e-5 / float(g.max())


_GRID = np.linspace(0.0, 1.0, 100001)


def speed_tau(data_std: float = 1.0, rel_threshold: float | None = None) -> float:
    """Smallest sigma above the increment's peak where g(sigma) < rel_threshold * max g."""
    rel = _ddpm_relative_threshold() if rel_threshold is None else rel_threshold
    g = speed_increment(_GRID, data_std)
    peak = int(np.argmax(g))
    below = np.nonzero(g[peak:] < rel * g[peak])[0]
    return float(_GRID[peak + below[0]]) if below.size else 1.0


class SpeeDSampling(Density):
    """SpeeD's asymmetric sampling for flow: pdf k/Z on [0, tau), 1/Z on [tau, 1],
    Z = k tau + 1 - tau. tau defaults to :func:`speed_tau` (about 0.97 for unit-variance data).
    No mirrored half batch (the paper's text has none; it would break i.i.d. draws)."""

    name = "speed"

    def __init__(self, k: float = 5.0, tau: float | None = None, data_std: float = 1.0):
        data_std = _num("data_std", data_std, lo=0, lo_open=True)
        tau = speed_tau(data_std) if tau is None else _num("tau", tau, lo=0, hi=1)
        super().__init__(k=_num("k", k, lo=0, lo_open=True), tau=tau, data_std=data_std)
        self.k, self.tau = self.params["k"], tau
        self.z = self.k * tau + 1.0 - tau

    def pdf(self, sigma):
        s = _arr(sigma)
        return np.where((s < 0) | (s > 1), 0.0, np.where(s < self.tau, self.k, 1.0) / self.z)

    def cdf(self, sigma):
        s = np.clip(_arr(sigma), 0.0, 1.0)
        return np.where(s < self.tau, self.k * s, self.k * self.tau + (s - self.tau)) / self.z

    def icdf(self, u):
        m = _arr(u) * self.z
        kt = self.k * self.tau
        return np.where(m < kt, m / self.k, self.tau + (m - kt))


class Transformed(Density):
    """A density shifted (sigma' = s sigma / (1 + (s - 1) sigma)) and/or truncated to [lo, hi]."""

    def __init__(self, base: Density, shift: float = 1.0, clamp=None):
        self.base = base
        self.shift = _num("shift", shift, lo=0, lo_open=True)
        if clamp is None:
            lo, hi = 0.0, 1.0
        else:
            if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
                raise TypeError(f"clamp must be a (lo, hi) pair, got {clamp!r}")
            lo, hi = _num("clamp[0]", clamp[0], 0, 1), _num("clamp[1]", clamp[1], 0, 1)
            if not lo < hi:
                raise ValueError(f"clamp must have lo < hi, got {clamp!r}")
        self.lo, self.hi = lo, hi
        self.f_lo = float(base.cdf(unshift_sigma(lo, self.shift)))
        self.f_hi = float(base.cdf(unshift_sigma(hi, self.shift)))
        if not self.f_hi > self.f_lo:
            raise ValueError(f"clamp {clamp!r} holds no probability mass of {base!r}")
        self.name = base.name
        self.params = dict(base.params, shift=self.shift, clamp=None if clamp is None else (lo, hi))

    def cdf(self, sigma):
        s = np.clip(_arr(sigma), self.lo, self.hi)
        return (self.base.cdf(unshift_sigma(s, self.shift)) - self.f_lo) / (self.f_hi - self.f_lo)

    def pdf(self, sigma):
        s = _arr(sigma)
        inside = (s >= self.lo) & (s <= self.hi)
        sc = np.clip(s, 0.0, 1.0)
        jac = self.shift / (self.shift - (self.shift - 1.0) * sc) ** 2  # d unshift / d sigma'
        p = self.base.pdf(unshift_sigma(sc, self.shift)) * jac / (self.f_hi - self.f_lo)
        return np.where(inside, p, 0.0)

    def icdf(self, u):
        v = self.f_lo + _arr(u) * (self.f_hi - self.f_lo)
        return np.clip(shift_sigma(self.base.icdf(v), self.shift), self.lo, self.hi)


# ------------------------------------------------------------------------------- weightings
def _check_prediction(prediction):
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    return prediction


class Weighting:
    """w(sigma, prediction) on the per-sample MSE of the prediction. ``inv_sigma2`` marks a
    weight with a sigma^-2 factor (kernels multiply it in exactly; the table holds the rest)."""

    name = "none"
    inv_sigma2 = False

    def __init__(self, **params):
        self.params = params

    def weight(self, sigma, prediction: str = "v") -> np.ndarray:
        _check_prediction(prediction)
        return np.ones_like(_arr(sigma))

    def smooth_part(self, sigma, prediction: str = "v") -> np.ndarray:
        """What the kernels' table holds: the weight without its sigma^-2 factor."""
        w = self.weight(sigma, prediction)
        return w * _arr(sigma) ** 2 if self.inv_sigma2 else w

    def __repr__(self) -> str:
        ps = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name}({ps})"


class NoWeighting(Weighting):
    name = "none"


class SigmaSqrt(Weighting):
    """diffusers' sigma_sqrt: sigma^-2 (inf at sigma = 0: clamp the sigma range with it)."""

    name = "sigma_sqrt"
    inv_sigma2 = True

    def weight(self, sigma, prediction="v"):
        _check_prediction(prediction)
        with np.errstate(divide="ignore"):
            return 1.0 / _arr(sigma) ** 2

    def smooth_part(self, sigma, prediction="v"):
        _check_prediction(prediction)
        return np.ones_like(_arr(sigma))


class CosMapWeight(Weighting):
    """diffusers' cosmap weight 2 / (pi (1 - 2 sigma + 2 sigma^2))."""

    name = "cosmap"

    def weight(self, sigma, prediction="v"):
        _check_prediction(prediction)
        s = _arr(sigma)
        return 2.0 / (math.pi * (1.0 - 2.0 * s + 2.0 * s * s))


class MinSNR(Weighting):
    """Min-SNR-gamma: min(SNR, gamma) on the x0 error (v: min((1-sigma)^2, gamma sigma^2);
    eps: min(1, gamma / SNR) with SNR = 0 -> 1)."""

    name = "min_snr"

    def __init__(self, gamma: float = 5.0):
        super().__init__(gamma=_num("gamma", gamma, lo=0, lo_open=True))
        self.gamma = self.params["gamma"]

    def weight(self, sigma, prediction="v"):
        _check_prediction(prediction)
        s = _arr(sigma)
        if prediction == "v":
            return np.minimum((1.0 - s) ** 2, self.gamma * s * s)
        r = snr(s)
        if prediction == "x0":
            return np.minimum(r, self.gamma)
        with np.errstate(divide="ignore"):
            return np.where(r > 0, np.minimum(1.0, self.gamma / np.where(r > 0, r, 1.0)), 1.0)


class P2(Weighting):
    """P2: (k + SNR)^-gamma on the eps error; v: (1 - sigma)^2 times that, x0: SNR times that."""

    name = "p2"

    def __init__(self, k: float = 1.0, gamma: float = 1.0):
        super().__init__(k=_num("k", k, lo=0, lo_open=True), gamma=_num("gamma", gamma, lo=0))
        self.k, self.gamma = self.params["k"], self.params["gamma"]

    def weight(self, sigma, prediction="v"):
        _check_prediction(prediction)
        s = np.clip(_arr(sigma), 1e-12, 1.0)  # SNR -> inf at 0: take the limit through a tiny sigma
        r = snr(s)
        w_eps = (self.k + r) ** (-self.gamma)
        if prediction == "eps":
            return w_eps
        if prediction == "v":
            return (1.0 - s) ** 2 * w_eps
        return r * w_eps


class SpeeDWeighting(Weighting):
    """SpeeD's change-aware weight for flow: (1 - lam) + (2 lam - 1) g(sigma) / max g for
    sigma < tau and ``after`` (1, as the official code) above. The same for every target, as
    the official code (it multiplies whatever MSE is trained)."""

    name = "caw"

    def __init__(self, lam: float = 0.6, tau: float | None = None, data_std: float = 1.0, after: float = 1.0):
        data_std = _num("data_std", data_std, lo=0, lo_open=True)
        tau = speed_tau(data_std) if tau is None else _num("tau", tau, lo=0, hi=1)
        super().__init__(lam=_num("lam", lam, lo=0, hi=1), tau=tau, data_std=data_std,
                         after=_num("after", after, lo=0))
        self.lam, self.tau, self.data_std, self.after = self.params["lam"], tau, data_std, self.params["after"]
        self.g_max = float(speed_increment(_GRID, data_std).max())

    def weight(self, sigma, prediction="v"):
        _check_prediction(prediction)
        s = _arr(sigma)
        g_hat = speed_increment(s, self.data_std) / self.g_max
        return np.where(s < self.tau, (1.0 - self.lam) + (2.0 * self.lam - 1.0) * g_hat, self.after)


# ------------------------------------------------------------------------------- strategies
DENSITIES = {
    "uniform": UniformDensity, "logit_normal": LogitNormal, "mode": Mode, "cosmap": CosMap,
    "laplace": LaplaceLogSNR, "edm_lognormal": EDMLogNormal, "beta": Beta, "speed": SpeeDSampling,
}
WEIGHTINGS = {
    "none": NoWeighting, "sigma_sqrt": SigmaSqrt, "cosmap": CosMapWeight, "min_snr": MinSNR,
    "p2": P2, "caw": SpeeDWeighting, "speed": SpeeDWeighting,
}


def densities() -> list[str]:
    return sorted(DENSITIES)


def weightings() -> list[str]:
    return sorted(WEIGHTINGS)


def names() -> list[str]:
    """Every single name get() accepts (pairs "a+b" combine a density and a weighting)."""
    return sorted(set(DENSITIES) | set(WEIGHTINGS))


class FlowStrategy:
    """A sampling density and a weighting (what FlowMatchingLoss builds its tables from)."""

    def __init__(self, density: Density, weighting: Weighting, name: str | None = None):
        if not isinstance(density, Density):
            raise TypeError(f"density must be a Density, got {type(density).__name__}")
        if not isinstance(weighting, Weighting):
            raise TypeError(f"weighting must be a Weighting, got {type(weighting).__name__}")
        self.density = density
        self.weighting = weighting
        self.name = name or f"{density.name}+{weighting.name}"

    def pdf(self, sigma):
        return self.density.pdf(sigma)

    def cdf(self, sigma):
        return self.density.cdf(sigma)

    def icdf(self, u):
        return self.density.icdf(u)

    def weight(self, sigma, prediction="v"):
        return self.weighting.weight(sigma, prediction)

    def __repr__(self) -> str:
        return f"FlowStrategy({self.density!r}, {self.weighting!r})"


def _take(cls, params: dict, used: set) -> Any:
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    mine = {k: v for k, v in params.items() if k in accepted}
    used.update(mine)
    return cls(**mine)


def get(name, shift: float = 1.0, clamp=None, **params) -> FlowStrategy:
    """A FlowStrategy by name (a density, a weighting, "speed", or "density+weighting").
    ``shift`` and ``clamp`` apply to the density; other parameters go to the part that accepts
    them (ValueError for one that no part accepts)."""
    if isinstance(name, FlowStrategy):
        if params or shift != 1.0 or clamp is not None:
            raise ValueError("parameters only go with a strategy given by name")
        return name
    if not isinstance(name, str):
        raise TypeError(f"strategy must be a name or a FlowStrategy, got {type(name).__name__}")
    name = name.replace("-", "_")  # the DDPM registry spells "logit-normal", "min-snr": accept both
    parts = name.split("+")
    if len(parts) == 1:
        n = parts[0]
        if n == "speed":
            d_name, w_name = "speed", "caw"
        elif n in DENSITIES:
            d_name, w_name = n, "none"
        elif n in WEIGHTINGS:
            d_name, w_name = "uniform", n
        else:
            raise ValueError(f"unknown flow strategy {n!r}; known: {', '.join(names())} (or 'density+weighting')")
    elif len(parts) == 2:
        d_name, w_name = parts
        if d_name not in DENSITIES:
            raise ValueError(f"unknown flow density {d_name!r}; known: {', '.join(densities())}")
        if w_name not in WEIGHTINGS:
            raise ValueError(f"unknown flow weighting {w_name!r}; known: {', '.join(weightings())}")
    else:
        raise ValueError(f"strategy {name!r}: give one name or a 'density+weighting' pair")
    used: set = set()
    density = _take(DENSITIES[d_name], params, used)
    weighting = _take(WEIGHTINGS[w_name], params, used)
    unknown = set(params) - used
    if unknown:
        raise ValueError(f"parameters {sorted(unknown)} are not accepted by {d_name!r} or {w_name!r}")
    if shift != 1.0 or clamp is not None:
        density = Transformed(density, shift, clamp)
    return FlowStrategy(density, weighting, name=name)


def from_diffusers(weighting_scheme: str = "none", logit_mean: float = 0.0, logit_std: float = 1.0,
                   mode_scale: float = 1.29, shift: float = 1.0, clamp=None) -> FlowStrategy:
    """The strategy a diffusers SD3/FLUX script runs with ``--weighting_scheme`` (the same flag
    picks the density and the weight there): logit_normal -> logit-normal(-logit_mean, logit_std)
    (their sigma is ~ 1 - u), mode -> mode(mode_scale), sigma_sqrt / cosmap -> uniform sampling
    with that weight, none -> uniform."""
    if weighting_scheme == "logit_normal":
        return get("logit_normal", mean=-logit_mean, std=logit_std, shift=shift, clamp=clamp)
    if weighting_scheme == "mode":
        return get("mode", scale=mode_scale, shift=shift, clamp=clamp)
    if weighting_scheme in ("sigma_sqrt", "cosmap", "none"):
        return get(f"uniform+{weighting_scheme}", shift=shift, clamp=clamp)
    raise ValueError(
        f"weighting_scheme must be one of 'logit_normal', 'mode', 'sigma_sqrt', 'cosmap', 'none'; got {weighting_scheme!r}"
    )


# ------------------------------------------------------------------------------- tables
QUANTILE_BITS = 12
N_QUANTILES = 1 << QUANTILE_BITS  # cells of the inverse-CDF table (u * N is exact in float32)
N_WEIGHTS = 4096  # cells of the weight table over sigma


def round_to_bits(x: np.ndarray, bits: int) -> np.ndarray:
    """x truncated toward zero to `bits` significant bits (float32-representable)."""
    x = _arr(x)
    m, e = np.frexp(x)
    return np.ldexp(np.trunc(m * (1 << bits)) / (1 << bits), e)


def quantile_rows(density: Density) -> tuple[np.ndarray, np.ndarray]:
    """(q, dq): float32-exact quantiles q[i] = Q(i / N) (i = 0..N) and slopes dq[i] with at most
    QUANTILE_BITS significant bits, truncated so q[i] + dq[i] <= q[i + 1].

    Draw: pos = u * N (exact: N is a power of two), j = floor(pos), f = pos - j (a multiple of
    2^-12), sigma = q[j] + f * dq[j]. f * dq[j] has at most 24 significant bits, so it is exact in
    float32 and one rounding remains: the same sigma bit for bit whether a backend fuses the
    multiply-add or not."""
    u = np.arange(N_QUANTILES + 1, dtype=np.float64) / N_QUANTILES
    q = np.clip(density.icdf(u), 0.0, 1.0)
    q[0], q[-1] = max(q[0], 0.0), min(q[-1], 1.0)
    q = np.maximum.accumulate(np.nan_to_num(q, nan=0.0))
    q32 = q.astype(np.float32).astype(np.float64)
    q32 = np.maximum.accumulate(q32)
    dq = np.zeros_like(q32)
    dq[:-1] = round_to_bits(np.maximum(q32[1:] - q32[:-1], 0.0), QUANTILE_BITS)
    return q32, dq


def weight_row(weighting: Weighting, prediction: str) -> np.ndarray:
    """The weight's smooth part on sigma = i / M, i = 0..M (float64; kernels interpolate)."""
    s = np.arange(N_WEIGHTS + 1, dtype=np.float64) / N_WEIGHTS
    w = weighting.smooth_part(s, prediction)
    if not np.all(np.isfinite(w)):
        bad = int(np.nonzero(~np.isfinite(w))[0][0])
        raise ValueError(f"weighting {weighting!r} is not finite at sigma={s[bad]} for prediction={prediction!r}")
    if np.any(w < 0):
        raise ValueError(f"weighting {weighting!r} is negative for prediction={prediction!r}")
    return w
