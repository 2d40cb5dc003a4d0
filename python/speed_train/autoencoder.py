"""`speed-kernels encode`: a small KL-regularised autoencoder and a cache of latents to train DiT on.

    speed-kernels encode --data fashion-mnist --out latents/fmnist        # ~33 min on one CPU core
    speed-kernels train --data latents:latents/fmnist --model DiT-tiny --learn-sigma
    speed-kernels compare --data latents:latents/fmnist --model DiT-tiny --learn-sigma

The paper trains DiT on SD-VAE latents; this is the same regime at a size a CPU can make: an
LDM-style autoencoder (Rombach et al. 2022) with a diagonal-Gaussian posterior, ``latent_channels``
(default 4) channels and a spatial downsampling factor ``downsample`` (2, 4 or 8; default 4, so
Fashion-MNIST padded to 32x32 becomes 4x8x8). Loss per image: the summed squared reconstruction
error plus ``kl_weight`` times the summed KL of the posterior to N(0, I) (LDM uses a perceptual and a
GAN term too; at 32x32 grey-scale the MSE alone is enough to make the latent regime).

The cached latents are the posterior means of every training image, multiplied by the latent
scale factor ``scale = 1 / std(latents)`` (LDM's rule: the std over all latent elements), so the
diffusion model sees unit-variance data as DiT does with SD-VAE's 0.18215. The folder holds:

- ``latents.npz``: ``x`` [N, C, h, w] float32 scaled latents, ``y`` labels, ``scale``;
- ``autoencoder.pt``: the architecture, both networks' weights, ``scale``, the source data spec;
- ``info.json``: how it was made and its reconstruction quality.

Reconstruction quality is measured on images the evaluator holds out (Fashion-MNIST: test images,
never trained on; digits: there is no split, the autoencoder sees all 1,797): pixel MSE, and every
metric of :class:`speed_train.metrics.Evaluator` on the reconstructions against the real reference
half. The reconstruction score is the floor of anything trained on the latents: a perfect latent
diffusion model reproduces the latent distribution and its decoded samples score like reconstructions.

``--data latents:PATH`` (speed_train.data) loads ``latents.npz`` for training; :func:`latent_evaluator`
decodes samples (``z / scale`` through the decoder) before scoring them in pixel space.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

__all__ = ["KLAutoencoder", "train_autoencoder", "encode_dataset", "load_latents", "load_autoencoder",
           "latent_evaluator", "LatentEvaluator", "add_encode_command", "latent_scale"]

from .latents import INFO_FILE, LATENTS_FILE, MODEL_FILE, encode_folder as _folder, load_latents  # noqa: F401


# ---------------------------------------------------------------------------------- the model


class KLAutoencoder(nn.Module):
    """Conv encoder -> (mean, logvar) of a diagonal Gaussian over [latent_channels, H/f, W/f];
    conv decoder back to [in_channels, H, W]. f = ``downsample`` (a power of two, 2..8)."""

    def __init__(self, in_channels: int = 1, latent_channels: int = 4, downsample: int = 4, width: int = 64):
        super().__init__()
        for name, v, lo in (("in_channels", in_channels, 1), ("latent_channels", latent_channels, 1), ("width", width, 4)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if downsample not in (2, 4, 8):
            raise ValueError(f"downsample must be 2, 4 or 8, got {downsample!r}")
        self.config = dict(in_channels=in_channels, latent_channels=latent_channels, downsample=downsample,
                           width=width)
        n_down = int(math.log2(downsample))
        # narrow at full resolution, ``width`` at the latent resolution: the full-size layers dominate the cost
        chans = [max(4, width >> (n_down - i)) for i in range(n_down + 1)]  # e.g. 16, 32, 64 for f = 4
        enc: list[nn.Module] = [nn.Conv2d(in_channels, chans[0], 3, padding=1), nn.SiLU()]
        for i in range(n_down):
            enc += [nn.Conv2d(chans[i], chans[i + 1], 4, stride=2, padding=1), nn.SiLU(),
                    nn.Conv2d(chans[i + 1], chans[i + 1], 3, padding=1), nn.SiLU()]
        enc += [nn.Conv2d(chans[-1], 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, chans[-1], 3, padding=1), nn.SiLU(),
                                nn.Conv2d(chans[-1], chans[-1], 3, padding=1), nn.SiLU()]
        for i in reversed(range(n_down)):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(chans[i + 1], chans[i], 3, padding=1),
                    nn.SiLU(), nn.Conv2d(chans[i], chans[i], 3, padding=1), nn.SiLU()]
        dec += [nn.Conv2d(chans[0], in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of the posterior, logvar clamped to [-30, 20] as LDM does."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """(reconstruction from a posterior sample, mean, logvar)."""
        mean, logvar = self.encode(x)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.decode(mean + torch.exp(0.5 * logvar) * eps), mean, logvar


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, e^logvar) || N(0, 1)) summed over all but the batch dimension: [B]."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def latent_scale(latents: torch.Tensor) -> float:
    """LDM's latent scale factor: 1 / std of all latent elements."""
    std = float(latents.double().std())
    if not std > 0:
        raise ValueError("latents have zero spread: the encoder collapsed; cannot compute a scale factor")
    return 1.0 / std


def train_autoencoder(images: torch.Tensor, *, latent_channels: int = 4, downsample: int = 4, width: int = 64,
                      steps: int = 1500, batch_size: int = 128, lr: float = 2e-3, kl_weight: float = 1e-4,
                      seed: int = 0, device: str = "cpu", log_every: int = 0) -> tuple[KLAutoencoder, dict]:
    """Train on ``images`` [N, C, H, W] in [-1, 1]; returns (model in eval mode on CPU, info).
    AdamW with a cosine decay of the learning rate to 0 over ``steps``."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a [N, C, H, W] tensor, got {getattr(images, 'shape', type(images))}")
    H, W = images.shape[2:]
    if H % downsample or W % downsample:
        raise ValueError(f"image size {H}x{W} is not divisible by downsample={downsample}")
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not (isinstance(kl_weight, (int, float)) and kl_weight >= 0):
        raise ValueError(f"kl_weight must be a non-negative number, got {kl_weight!r}")
    torch.manual_seed(seed)
    dev = torch.device(device)
    model = KLAutoencoder(images.shape[1], latent_channels, downsample, width).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    gd = torch.Generator(device=dev).manual_seed(seed + 1)
    data = images.to(dev, torch.float32)
    n = data.shape[0]
    t0 = time.perf_counter()
    log = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g).to(dev)
        x = data[idx]
        rec, mean, logvar = model(x, generator=gd)
        rec_loss = (rec - x).pow(2).flatten(1).sum(1)
        kl = kl_to_standard_normal(mean, logvar)
        loss = (rec_loss + kl_weight * kl).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps):
            entry = {"step": step, "mse": float(rec_loss.detach().mean()) / x[0].numel(),
                     "kl": float(kl.detach().mean())}
            log.append(entry)
            print(f"  autoencoder step {step}: mse {entry['mse']:.5f}, kl {entry['kl']:.1f}", flush=True)
    model = model.cpu().eval().requires_grad_(False)
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "kl_weight": kl_weight, "seed": seed,
            "train_time_s": round(time.perf_counter() - t0, 1), "params": sum(p.numel() for p in model.parameters()),
            "log": log, **model.config}
    return model, info


@torch.no_grad()
def _batched(fn, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)])


# ---------------------------------------------------------------------------------- the cache


def encode_dataset(data: str = "fashion-mnist", out: str | Path = "latents/fashion-mnist", *,
                   latent_channels: int = 4, downsample: int = 4, width: int = 64, steps: int = 1500,
                   batch_size: int = 128, lr: float = 2e-3, kl_weight: float = 1e-4, seed: int = 0,
                   device: str = "cpu", eval_samples: int = 1000, threads: int | None = None,
                   verbose: bool = True) -> dict:
    """Train the autoencoder on ``data`` (a name speed_train.data loads), cache the scaled latents,
    the networks and the scale under ``out``, measure reconstruction quality. Returns the info dict."""
    from .data import load_dataset
    from .metrics import Evaluator

    if threads is not None:
        torch.set_num_threads(int(threads))
    say = print if verbose else (lambda *a, **k: None)
    ds = load_dataset(data, flip=False)
    if not ds.pixel_space:
        raise ValueError(f"--data {data!r} is not image data in [-1, 1]; encode images, not arrays")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say(f"encode: training a KL autoencoder on {ds.name} {tuple(ds.images.shape)} "
        f"({latent_channels} latent channels, downsample {downsample}, {steps} steps)")
    model, info = train_autoencoder(ds.images, latent_channels=latent_channels, downsample=downsample, width=width,
                                    steps=steps, batch_size=batch_size, lr=lr, kl_weight=kl_weight, seed=seed,
                                    device=device, log_every=max(1, steps // 10) if verbose else 0)
    mean = _batched(lambda x: model.encode(x)[0], ds.images)
    scale = latent_scale(mean)
    z = (mean * scale).float()
    np.savez(out / LATENTS_FILE, x=z.numpy(), y=(ds.labels.numpy() if ds.labels is not None else np.zeros(0)),
             scale=np.float64(scale))
    torch.save({"config": model.config, "encoder": model.encoder.state_dict(), "decoder": model.decoder.state_dict(),
                "scale": scale, "data": data, "image_shape": list(ds.shape), "num_classes": ds.num_classes}, out / MODEL_FILE)

    say(f"encode: latents {tuple(z.shape)}, scale factor {scale:.4f} (1/std); measuring reconstructions")
    ev = Evaluator.for_dataset(data, n_samples=None)
    held = ev.heldout_images[:eval_samples]
    rec = _batched(lambda x: model.decode(model.encode(x)[0]), held)
    scores = ev(rec)
    mse = float((rec.clamp(-1, 1) - held).pow(2).mean())
    real = ev(held)  # the held-out real images themselves: real half B vs real half A at the same N
    info.update({
        "data": data, "out": str(out), "latent_shape": list(z.shape[1:]), "n_latents": int(z.shape[0]),
        "scale": scale, "latent_std_after_scaling": float(z.double().std()), "latent_mean_after_scaling": float(z.double().mean()),
        "recon_eval": {"n": int(held.shape[0]), "images": "evaluator held-out half" + (
            " (test split, not trained on)" if ev.dataset_id == "fashion-mnist" else " (the autoencoder trained on them)"),
            "mse": mse, **{m: scores[m] for m in ev.metric_names}},
        "real_vs_real": {m: real[m] for m in ev.metric_names},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__, "threads": torch.get_num_threads(),
    })
    (out / INFO_FILE).write_text(json.dumps(info, indent=1))
    say(f"encode: reconstruction of {held.shape[0]} held-out images: MSE {mse:.5f}; "
        + ", ".join(f"{m} {scores[m]:.4g} (real vs real {real[m]:.4g})" for m in ev.metric_names))
    say(f"wrote {out / LATENTS_FILE}, {out / MODEL_FILE}, {out / INFO_FILE}")
    return info


def load_autoencoder(path: str | Path) -> tuple[KLAutoencoder, dict]:
    """(autoencoder in eval mode on CPU, checkpoint dict without the weights)."""
    p = _folder(path)
    ck = torch.load(p / MODEL_FILE, map_location="cpu", weights_only=True)
    model = KLAutoencoder(**ck["config"])
    model.encoder.load_state_dict(ck["encoder"])
    model.decoder.load_state_dict(ck["decoder"])
    return model.eval().requires_grad_(False), {k: v for k, v in ck.items() if k not in ("encoder", "decoder")}


# ---------------------------------------------------------------------------------- scoring decoded samples


class LatentEvaluator:
    """An :class:`~speed_train.metrics.Evaluator` of the source images behind a decoder: scaled latents
    are divided by ``scale``, decoded, and scored in pixel space against the real images. Everything
    else (floor, metric_names, describe, ...) is the pixel evaluator's; ``decode`` is public so that
    sample grids can show images. ``describe()`` adds the decoder folder and the reconstruction score."""

    def __init__(self, pixel_evaluator, autoencoder: KLAutoencoder, scale: float, folder: str):
        self.pixel = pixel_evaluator
        self.autoencoder = autoencoder
        self.scale = float(scale)
        self.folder = folder
        self.latent_shape = None

    def __getattr__(self, name):  # only called for attributes not set here
        if name == "pixel":
            raise AttributeError(name)
        return getattr(self.pixel, name)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
            raise ValueError(f"latents must be a [N, C, h, w] tensor, got {getattr(latents, 'shape', type(latents))}")
        z = latents.detach().to("cpu", torch.float32) / self.scale
        return _batched(self.autoencoder.decode, z, 512)

    def __call__(self, samples: torch.Tensor, **kwargs) -> dict:
        out = self.pixel(self.decode(samples), **kwargs)
        out["decoded_by"] = self.folder
        return out

    def describe(self) -> dict:
        d = self.pixel.describe()
        d["decoded_by"] = self.folder
        d["latent_scale"] = self.scale
        info = Path(self.folder) / INFO_FILE
        if info.exists():
            d["reconstruction"] = json.loads(info.read_text()).get("recon_eval")
        return d


def latent_evaluator(spec: str, **kwargs) -> LatentEvaluator:
    """``Evaluator.for_dataset`` for ``latents:PATH``: the pixel evaluator of the data the latents were
    made from, behind the cached decoder. ``kwargs`` go to the pixel evaluator."""
    from .metrics import Evaluator

    path = spec[len("latents:"):] if spec.startswith("latents:") else spec
    model, ck = load_autoencoder(path)
    return LatentEvaluator(Evaluator.for_dataset(ck["data"], **kwargs), model, ck["scale"], str(_folder(path)))


def latent_decoder(spec: str):
    """``latents -> images`` for ``latents:PATH`` (the cached decoder behind the latent scale), so
    sample grids of a latent run show images rather than latent channels."""
    path = spec[len("latents:"):] if spec.startswith("latents:") else spec
    model, ck = load_autoencoder(path)
    scale = float(ck["scale"])
    return lambda z: _batched(model.decode, z.detach().to("cpu", torch.float32) / scale, 512)


# ---------------------------------------------------------------------------------- CLI


def add_encode_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "encode", help="train a small KL autoencoder and cache latents (train/compare with --data latents:PATH)",
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="fashion-mnist", help="image data: fashion-mnist | digits | a folder")
    p.add_argument("--out", default="latents/fashion-mnist", help="folder for latents.npz, autoencoder.pt, info.json")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--downsample", type=int, default=4, choices=[2, 4, 8])
    p.add_argument("--width", type=int, default=64, help="channels of the conv layers")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the summed KL against the summed squared error")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval-samples", type=int, default=1000, help="held-out images for the reconstruction scores")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_encode)
    return p


def cmd_encode(args) -> int:
    encode_dataset(args.data, args.out, latent_channels=args.latent_channels, downsample=args.downsample,
                   width=args.width, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                   kl_weight=args.kl_weight, seed=args.seed, device=args.device, eval_samples=args.eval_samples,
                   threads=args.threads)
    return 0
