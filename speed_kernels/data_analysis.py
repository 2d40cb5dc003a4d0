"""Where the convergence area starts for *this data*: SpeeD's analysis with the data's spectrum.

SpeeD's τ (speed_kernels.analysis.areas) looks at the schedule only: it is where √(1-ᾱ_t) stops
moving, which is where x_t stops carrying information about x0 *if every direction of the data has
unit variance*. Real data does not: in x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε, the direction of the data
covariance with variance λ has signal-to-noise ratio λ·SNR_t (SNR_t = ᾱ_t/(1-ᾱ_t)), so the
strongest directions (for images, the coarse low-frequency ones; their variance grows with the
resolution) are still visible in x_t long after τ. This is the resolution effect behind the noise
shifts of "simple diffusion" (Hoogeboom et al. 2023) and SD3.

Rule (documented, not fitted to any training result): with λ_max the largest eigenvalue of the
data covariance (the data in its own units, mean removed: the model does not need x_t to learn the
mean),

    τ_data = 1 + first t with λ_max·SNR_t ≤ SNR_{τ0 - 1},

τ0 the schedule's own τ. For data whose strongest direction has unit variance this gives τ0 exactly
(the schedule rule's assumption); stronger directions push τ_data later, weaker ones earlier.
Equivalently: τ_data is the schedule's τ for the data rescaled to unit top variance.

Recommended k (SpeeD's probability ratio before/after τ): a heuristic stated as such, 1 + 4·min(1,
(T - τ_data)/(0.3·T)): the paper's k = 5 when the convergence area is at least as long as the one
its k was tuned on (T - 700 on linear T = 1000), falling to k = 1 (uniform: nothing to skip) as
the area vanishes. The report also gives the Gaussian mutual information between x0 and x_t,
I_t = ½·Σ_λ log(1 + λ·SNR_t) nats, at the schedule's τ and at τ_data, so a user can see how much
x_t still says about x0 where SpeeD down-weights.

What the regime study measured (benchmarks/regimes.py, README): SpeeD at τ_data was no faster than
at the schedule's τ in any regime (as fast on pixel Fashion-MNIST, slower on its latents and on
digits, the intervals overlapping on digits), so τ_data is reported as a
diagnostic of where the data's convergence area lies, not as a better default; the report says so.

The spectrum is the eigenvalues of the covariance of at most ``max_samples`` examples, flattened;
above ``max_dims`` dimensions only λ_max is found (power iteration on the centred samples).
"""
from __future__ import annotations

import math
from typing import Any, Dict

import numpy as np

from speed_kernels.process import TAU_THRESHOLD, areas
from speed_kernels.schedules import NoiseSchedule

__all__ = ["data_spectrum", "data_areas", "recommend_k", "load_data_array", "format_data_report"]


def _as_samples(data: Any, max_samples: int, seed: int) -> np.ndarray:
    try:
        import torch

        if isinstance(data, torch.Tensor):
            data = data.detach().cpu().double().numpy()
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(data, np.ndarray):
        raise TypeError(f"data must be a numpy array or a torch tensor, got {type(data).__name__}")
    if data.ndim < 2:
        raise ValueError(f"data must be [N, ...] with N examples of at least one value each, got shape {data.shape}")
    x = np.asarray(data, dtype=np.float64).reshape(data.shape[0], -1)
    if x.shape[0] < 2:
        raise ValueError(f"data needs at least 2 examples, got {x.shape[0]}")
    if not np.all(np.isfinite(x)):
        raise ValueError("data contains non-finite values")
    if x.shape[0] > max_samples:
        x = x[np.random.default_rng(seed).choice(x.shape[0], max_samples, replace=False)]
    return x


def data_spectrum(data: Any, *, max_samples: int = 10000, max_dims: int = 4096, seed: int = 0) -> Dict[str, Any]:
    """Eigenvalues of the data covariance (descending; ``None`` above ``max_dims`` dims), its largest
    eigenvalue, the total variance (trace), the dimension, the per-value std about the mean example
    (``std``, what the spectrum sees) and the std of all values about their one overall mean
    (``std_all``, LDM's latent-scale statistic: it also counts the spread of the mean example, so
    latents scaled to ``std_all`` 1 can show ``std`` well below 1)."""
    x = _as_samples(data, max_samples, seed)
    n, d = x.shape
    xc = x - x.mean(0)
    total = float((xc ** 2).sum() / (n - 1))
    if total <= 0:
        raise ValueError("data has zero variance: no spectrum to analyse")
    if d <= max_dims:
        cov = xc.T @ xc / (n - 1) if d <= n else None
        if cov is not None:
            ev = np.linalg.eigvalsh(cov)[::-1]
        else:  # fewer examples than dimensions: the non-zero eigenvalues are those of the Gram matrix
            ev = np.linalg.eigvalsh(xc @ xc.T / (n - 1))[::-1]
        ev = np.clip(ev, 0.0, None)
        lam = float(ev[0])
    else:
        ev = None
        v = np.random.default_rng(seed).standard_normal(d)
        v /= np.linalg.norm(v)
        lam = 0.0
        for _ in range(200):
            w = xc.T @ (xc @ v) / (n - 1)
            new = float(np.linalg.norm(w))
            v = w / new
            if abs(new - lam) <= 1e-10 * new:
                break
            lam = new
        lam = new
    return {"eigenvalues": ev, "lambda_max": lam, "total_variance": total, "dims": d, "n": n,
            "std": math.sqrt(total / d), "std_all": float(x.std(ddof=1))}


def recommend_k(tau: int, T: int) -> float:
    """1 + 4·min(1, (T - τ)/(0.3·T)): 5 with a convergence area of 30 % of T or more, 1 without one."""
    return 1.0 + 4.0 * min(1.0, max(0, T - int(tau)) / (0.3 * T))


def data_areas(data: Any, schedule: NoiseSchedule, *, tau_threshold: float = TAU_THRESHOLD,
               max_samples: int = 10000, max_dims: int = 4096, seed: int = 0) -> Dict[str, Any]:
    """The data-aware convergence area of ``data`` (an [N, ...] array in the units the model sees)
    under ``schedule`` (see the module docstring for the rule). Returns a dict with ``tau_schedule``,
    ``tau_data``, ``k`` (recommended), ``lambda_max``, ``std``, ``std_all``, ``snr_threshold``, the
    information curve ``info_nats`` [T] and its values ``info_at_tau_schedule`` / ``info_at_tau_data`` (all None
    above ``max_dims``)."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    spec = data_spectrum(data, max_samples=max_samples, max_dims=max_dims, seed=seed)
    area = areas(schedule, tau_threshold=tau_threshold)
    T, tau0 = schedule.T, int(area["tau"])
    snr = schedule.numpy("snr")
    thr = float(snr[max(tau0, 1) - 1])
    lam = spec["lambda_max"]
    below = np.flatnonzero(lam * snr <= thr)
    tau = T if below.size == 0 else min(int(below[0]) + 1, T)
    info = at0 = at1 = None
    if spec["eigenvalues"] is not None:
        ev = spec["eigenvalues"][spec["eigenvalues"] > 0]
        info = 0.5 * np.log1p(np.outer(snr, ev)).sum(1)
        at0, at1 = float(info[min(tau0, T - 1)]), float(info[min(tau, T - 1)])
    return {
        "schedule": schedule.name, "T": T, "tau_schedule": tau0, "tau_data": int(tau), "k": recommend_k(tau, T),
        "lambda_max": lam, "std": spec["std"], "std_all": spec["std_all"],
        "total_variance": spec["total_variance"], "dims": spec["dims"],
        "n": spec["n"], "snr_threshold": thr,
        "top_snr_at_tau_schedule": float(lam * snr[min(tau0, T - 1)]),
        "info_nats": info, "info_at_tau_schedule": at0, "info_at_tau_data": at1,
        "rule": "tau_data = 1 + first t with lambda_max * SNR_t <= SNR[tau_schedule - 1]; "
                "k = 1 + 4 * min(1, (T - tau_data) / (0.3 T))",
    }


def load_data_array(spec: str, loader=None) -> np.ndarray:
    """An [N, ...] float array for ``--data SPEC``: through ``loader(spec)`` when the application
    passes one (the `speed-kernels` command passes speed_train's dataset loader: digits,
    fashion-mnist, latents:PATH, folders), else from a .npy/.npz file (the library alone)."""
    if loader is not None:
        return np.asarray(loader(spec))
    if spec.endswith(".npy"):
        return np.load(spec)
    if spec.endswith(".npz"):
        with np.load(spec) as z:
            return z[z.files[0]]
    raise ValueError(f"--data {spec!r}: dataset names need the `speed-kernels` command; "
                     "speed_kernels alone reads .npy/.npz files")


def format_data_report(rep: Dict[str, Any], name: str = "data") -> str:
    i0, i1 = rep["info_at_tau_schedule"], rep["info_at_tau_data"]
    lines = [
        f"data: {name} ({rep['n']} examples of {rep['dims']} values; std {rep['std']:.4g} about the mean example, "
        f"{rep['std_all']:.4g} over all values; "
        f"largest covariance eigenvalue {rep['lambda_max']:.4g})",
        f"  schedule's tau {rep['tau_schedule']} (unit-variance data); this data's tau {rep['tau_data']} "
        f"(strongest direction's SNR reaches {rep['snr_threshold']:.3g} there)",
        f"  at the schedule's tau the strongest direction still has SNR {rep['top_snr_at_tau_schedule']:.3g}"
        + (f"; x_t still carries {i0:.3g} nats of (Gaussian) information about x0 there ({i1:.3g} at this "
           f"data's tau)" if i0 is not None else ""),
        f"  data-aware setting: speed with tau={rep['tau_data']}, k={rep['k']:.2g} "
        f"(--param tau={rep['tau_data']} --param k={rep['k']:.2g}); rule: {rep['rule']}",
        "  measured: in the regime study (README, 'Regime study') SpeeD at the data's tau was no faster than at",
        "  the schedule's tau on any regime and slower on latents; keep the schedule's tau as the default and",
        "  run `speed-kernels compare` with both on your data before switching",
    ]
    return "\n".join(lines)
