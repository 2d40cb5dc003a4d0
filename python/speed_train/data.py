"""Training data: in-memory tensors in [-1, 1] (or raw latents) and a seeded, resumable order.

Sources (``load_dataset(spec)``):

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, values 0..16 -> [-1, 1],
  1 channel, labels 0..9). Needs nothing beyond pip.
- ``fashion-mnist``: the Debian package ``dataset-fashion-mnist`` (IDX files under
  /usr/share/datasets/fashion-mnist/, read here with numpy), padded 28 -> 32 with the
  background value so that U-Nets and DiT patches divide the size.
- a folder of images (recursive; PIL; shorter side resized to ``image_size`` then
  center-cropped, as ADM does). Labels come from the first-level sub-folder names when
  there are at least two of them.
- ``latents:PATH``: the scaled latents cached by ``speed-kernels encode`` in the folder PATH
  (speed_train.autoencoder; free-range arrays, labels of the source images, no flips).
- a ``.npy`` / ``.npz`` file of N x C x H x W arrays, e.g. pre-encoded VAE latents. uint8
  arrays are mapped to [-1, 1]; float arrays are taken as they are (latents are already
  scaled). In an npz, images are the first of x / images / latents / arr_0 and labels the
  first of y / labels.

Horizontal flips (as the paper trains) default to on for photographs, Fashion-MNIST and
folders, and off for digits (a mirrored 2 or 7 is not a digit: flipping would teach the
model shapes that are not in the data) and for arrays (flipping a VAE latent is not
flipping the image). ``flip=True/False`` overrides.

The order (``DataOrder``) is a fresh permutation per epoch drawn from (seed, epoch), the
flip bit of every example drawn from the same generator, and each rank of a distributed
run reads its own strided shard of it. Its whole state is (epoch, index), so a
checkpoint resumes the exact batch sequence.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["ImageData", "DataOrder", "load_dataset", "FASHION_MNIST_DIR", "dataset_names"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass(eq=False)
class ImageData(torch.utils.data.Dataset):
    """All examples in memory: images float32 [N, C, H, W], labels int64 [N] or None."""

    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int
    name: str
    flip: bool
    pixel_space: bool  # [-1, 1] pixels (clip x0 when sampling) versus free-range latents

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        y = self.labels[i] if self.labels is not None else -1
        return self.images[i], y

    @property
    def shape(self):
        return tuple(self.images.shape[1:])


def dataset_names() -> list[str]:
    return ["digits", "fashion-mnist", "latents:<encode folder>", "<folder of images>", "<file.npy|file.npz>"]


def load_dataset(spec: str, image_size: int | None = None, flip: bool | None = None,
                 split: str = "train") -> ImageData:
    """Load a dataset by name or path (see the module docstring)."""
    key = str(spec).lower().replace("_", "-")
    if str(spec).startswith("latents:"):
        from .latents import load_latents

        x, y, meta = load_latents(str(spec)[len("latents:"):])
        data = ImageData(x, y, meta["num_classes"] if y is not None else 0, f"latents-{meta['data']}", False, False)
    elif key == "digits":
        x, y = _digits()
        data = ImageData(x, y, 10, "digits", False, True)
    elif key in ("fashion-mnist", "fashionmnist", "fmnist"):
        x, y = _fashion_mnist(split)
        data = ImageData(x, y, 10, "fashion-mnist", True, True)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"dataset {spec!r} not found: give digits, fashion-mnist, a folder of images "
                f"or a .npy/.npz file")
        if path.is_dir():
            x, y, k = _image_folder(path, image_size or 32)
            data = ImageData(x, y, k, path.name, True, True)
        elif path.suffix in (".npy", ".npz"):
            x, y, pixel = _arrays(path)
            k = int(y.max()) + 1 if y is not None else 0
            data = ImageData(x, y, k, path.stem, False, pixel)
        else:
            raise ValueError(f"dataset {spec!r}: expected a folder of images or a .npy/.npz file")
    if image_size is not None and image_size != data.images.shape[-1]:
        if not data.pixel_space:
            raise ValueError(f"cannot resize array data of size {data.images.shape[-1]} to {image_size}")
        data.images = torch.nn.functional.interpolate(
            data.images, size=(image_size, image_size), mode="bilinear", antialias=True,
            align_corners=False).clamp_(-1, 1)
    if flip is not None:
        data.flip = bool(flip)
    return data


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0 * 2 - 1).unsqueeze(1)
    return x.contiguous(), torch.from_numpy(d.target.astype(np.int64))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist(split: str):
    root = Path(os.environ.get("SPEED_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    prefix = {"train": "train", "test": "t10k"}[split]

    def find(stem):
        for name in (stem + ".gz", stem):
            if (root / name).exists():
                return root / name
        raise FileNotFoundError(
            f"Fashion-MNIST not found ({root / stem}[.gz] is missing). Install it with "
            f"`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or point "
            f"SPEED_FASHION_MNIST_DIR at a folder holding the IDX files.")

    imgs = _read_idx(find(f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(find(f"{prefix}-labels-idx1-ubyte"))
    x = torch.from_numpy(imgs.astype(np.float32) / 127.5 - 1).unsqueeze(1)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)  # 28 -> 32, background is black
    return x.contiguous(), torch.from_numpy(labels.astype(np.int64))


def _image_folder(root: Path, size: int):
    from PIL import Image

    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) under {root}")
    arrs = []
    for p in files:
        with Image.open(p) as im:
            im = im.convert("RGB")
            # ADM's center_crop_arr: resize the shorter side to `size`, then crop the middle
            s = size / min(im.size)
            im = im.resize((max(size, round(im.size[0] * s)), max(size, round(im.size[1] * s))),
                           Image.BICUBIC)
            left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
            arrs.append(np.asarray(im.crop((left, top, left + size, top + size))))
    x = torch.from_numpy(np.stack(arrs).astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2).contiguous()
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    if len(classes) >= 2 and all(len(p.relative_to(root).parts) > 1 for p in files):
        idx = {c: i for i, c in enumerate(classes)}
        y = torch.tensor([idx[p.relative_to(root).parts[0]] for p in files], dtype=torch.int64)
        return x, y, len(classes)
    return x, None, 0


def _arrays(path: Path):
    y = None
    if path.suffix == ".npz":
        with np.load(path) as z:
            xk = next((k for k in ("x", "images", "latents", "arr_0") if k in z.files), None)
            if xk is None:
                raise ValueError(f"{path}: no array named x, images, latents or arr_0 (has {z.files})")
            x = z[xk]
            yk = next((k for k in ("y", "labels") if k in z.files), None)
            if yk is not None:
                y = torch.from_numpy(z[yk].astype(np.int64).reshape(-1))
    else:
        x = np.load(path)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[2] != x.shape[3]:
        raise ValueError(f"{path}: expected N x C x H x W square arrays, got shape {x.shape}")
    pixel = x.dtype == np.uint8
    x = torch.from_numpy(x.astype(np.float32) / 127.5 - 1 if pixel else x.astype(np.float32))
    if y is not None and len(y) != len(x):
        raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
    return x.contiguous(), y, pixel


class DataOrder:
    """Seeded, resumable stream of batches for one rank.

    Epoch e's order is a permutation drawn from (seed, e); rank r of W reads positions
    r, r+W, ... of it (each rank the same count, n // W, so ranks stay in step). Batches
    run across epoch boundaries; the state is just (epoch, index).
    """

    def __init__(self, data: ImageData, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        n = len(data)
        if n // world_size < 1:
            raise ValueError(f"dataset of {n} examples is too small for {world_size} ranks")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_rank = n // world_size
        self.device = torch.device(device)
        # keep the tensors on the device when they are small enough (no copy per step)
        small = data.images.numel() * 4 < 2**30
        store = self.device if small else torch.device("cpu")
        self.images = data.images.to(store)
        self.labels = data.labels.to(store) if data.labels is not None else None
        self.epoch, self.index = 0, 0
        self._perm_epoch = None

    def _epoch_order(self, epoch: int):
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + epoch)
            n = len(self.data)
            perm = torch.randperm(n, generator=g)
            flips = torch.randint(0, 2, (n,), generator=g, dtype=torch.bool)
            perm = perm[self.rank::self.world_size][: self.per_rank]
            # one copy per epoch to where the images live: slicing them per step needs no transfer
            self._perm, self._flips = perm.to(self.images.device), flips[perm].to(self.images.device)
            self._perm_epoch = epoch
        return self._perm, self._flips

    def next_indices(self):
        """Indices and flip bits of the next batch (on the images' device); advances the state."""
        idx, flp = [], []
        need = self.batch_size
        while need:
            perm, flips = self._epoch_order(self.epoch)
            take = min(need, self.per_rank - self.index)
            idx.append(perm[self.index:self.index + take])
            flp.append(flips[self.index:self.index + take])
            self.index += take
            need -= take
            if self.index == self.per_rank:
                self.epoch, self.index = self.epoch + 1, 0
        return torch.cat(idx), torch.cat(flp)

    def next_batch(self):
        """(x [B, C, H, W] on the device, y [B] or None)."""
        idx, flips = self.next_indices()
        x = self.images[idx]
        if self.data.flip:
            x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
        y = self.labels[idx] if self.labels is not None else None
        if x.device != self.device:  # large data kept on the host: pinned, so the copy is async
            pin = self.device.type == "cuda"
            x = (x.pin_memory() if pin else x).to(self.device, non_blocking=pin)
            y = (y.pin_memory() if pin else y).to(self.device, non_blocking=pin) if y is not None else None
        return x, y

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, d):
        self.epoch, self.index = int(d["epoch"]), int(d["index"])
