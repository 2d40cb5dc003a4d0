"""Reading an ``speed-kernels encode`` folder: the scaled latents and their labels (the data layer's
half of the autoencoder; making the folder is speed_train.autoencoder's)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

LATENTS_FILE, MODEL_FILE, INFO_FILE = "latents.npz", "autoencoder.pt", "info.json"


def encode_folder(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_file():
        p = p.parent
    if not (p / LATENTS_FILE).exists() or not (p / MODEL_FILE).exists():
        raise FileNotFoundError(f"{p} holds no {LATENTS_FILE} + {MODEL_FILE}: make it with `speed-kernels encode --out {p}`")
    return p


def load_latents(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(scaled latents [N, C, h, w] float32, labels [N] or None, meta) from an ``encode`` folder."""
    p = encode_folder(path)
    with np.load(p / LATENTS_FILE) as z:
        x = torch.from_numpy(z["x"].astype(np.float32))
        y = torch.from_numpy(z["y"].astype(np.int64)) if z["y"].size else None
        scale = float(z["scale"])
    if x.ndim != 4:
        raise ValueError(f"{p / LATENTS_FILE}: expected N x C x h x w latents, got {tuple(x.shape)}")
    if y is not None and y.shape[0] != x.shape[0]:
        raise ValueError(f"{p / LATENTS_FILE}: {x.shape[0]} latents but {y.shape[0]} labels")
    ck = torch.load(p / MODEL_FILE, map_location="cpu", weights_only=True)
    meta = {"scale": scale, "data": ck["data"], "image_shape": ck["image_shape"], "num_classes": ck["num_classes"],
            "folder": str(p)}
    return x.contiguous(), y, meta
