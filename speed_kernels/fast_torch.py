"""`torch-fast`: the fallback backend for devices no kernel backend serves.

Plain PyTorch ops, as few as the loss path needs, drawing t and eps with torch's own generator
instead of the Philox contract. Same distributions, not the same bits: a run on `torch-fast`
does not reproduce a run on `cpp`/`triton`/`cuda`/`torch`. It is still deterministic and
resumable: the generator is re-seeded on every call from (key, call index, stream), so the
stream depends only on the seed, the rank and the call counter that `state_dict()` holds.

Why it exists: the bit-exact `torch` reference computes Philox4x32-10 with int64 tensor ops,
about a hundred small kernels per call; at small batches that costs ~15x a plain PyTorch step.
A user with no compiler, on Apple MPS, or with a failed build lands here instead, at about the
cost of the loss path written by hand (benchmarks/bench_cpu.py measures both side by side).
`backend="auto"` picks it only where no kernel backend exists for the device, and says so once.

Like the cpp backend's CPU cache, eps is regenerated in `loss()` (one randn), not stored.
"""
from __future__ import annotations

import torch

from . import reference
from .rng import MASK64, STREAM_EPS, STREAM_T
from .tables import ROW_CDF, ROW_SQRT_1MAB, ROW_SQRT_AB, ROW_WEIGHT


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def stream_seed(k0: int, k1: int, call: int, stream: int) -> int:
    """The generator seed of one (key, call, stream): well mixed, so neighbouring calls and
    the t / eps streams are unrelated."""
    key = (k0 | (k1 << 32)) & MASK64
    return _splitmix64(key ^ _splitmix64(((call << 1) | stream) & MASK64))


class TorchFastBackend:
    """Plain PyTorch with torch's generator (see the module docstring)."""

    name = "torch-fast"

    def __init__(self):
        self._generators: dict[torch.device, torch.Generator] = {}

    def supports(self, device: torch.device) -> bool:
        return True

    def _generator(self, device: torch.device, k0: int, k1: int, call: int, stream: int) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            self._generators[device] = gen
        gen.manual_seed(stream_seed(k0, k1, call, stream))
        return gen

    def _eps(self, x0: torch.Tensor, k0: int, k1: int, call: int) -> torch.Tensor:
        dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
        gen = self._generator(x0.device, k0, k1, call, STREAM_EPS)
        return torch.randn(x0.shape, generator=gen, dtype=dtype, device=x0.device)

    def noise(self, x0, t_in, a):
        tables, k0, k1, call, mirror, pivot = a.tables, a.k0, a.k1, a.call, a.mirror, a.pivot
        index = int(call)  # a host read of the counter: free on the CPU, where this backend mostly runs
        batch = x0.shape[0]
        if t_in is None:
            n_draw = batch // 2 + 1 if mirror else batch
            gen = self._generator(x0.device, k0, k1, index, STREAM_T)
            u = torch.rand(n_draw, generator=gen, dtype=torch.float32, device=x0.device)
            cdf = tables[ROW_CDF]
            t = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.numel() - 1)
            if mirror:  # the official SpeeD half batch: the rest mirrored around the pivot
                t = torch.cat([t, (t - pivot).abs()])[:batch]
        else:
            t = t_in
        eps = self._eps(x0, k0, k1, index)
        shape = (batch,) + (1,) * (x0.dim() - 1)
        xf = x0.to(eps.dtype)
        x_t = tables[ROW_SQRT_AB][t].to(eps.dtype).view(shape) * xf
        x_t.addcmul_(tables[ROW_SQRT_1MAB][t].to(eps.dtype).view(shape), eps)
        call.add_(1)
        return x_t.to(x0.dtype), t

    def loss(self, pred, x0, t, a, reduce_mean):
        tables, k0, k1, target, learn_sigma = a.tables, a.k0, a.k1, a.target, a.learn_sigma
        eps = self._eps(x0, k0, k1, int(a.call) - 1)
        if learn_sigma or target != 0:
            return reference.loss(pred, x0, t, tables, k0, k1, None, target, learn_sigma, reduce_mean, eps=eps)
        # eps target, the common case, in four ops: (out - eps)^2, per-sample mean, weight, batch mean
        out = pred if pred.dtype == eps.dtype else pred.to(eps.dtype)
        mse = (out - eps).pow(2).flatten(1).mean(1)
        mse = mse * tables[ROW_WEIGHT][t].to(mse.dtype)
        detached = mse.detach()
        terms = torch.stack([detached, torch.zeros_like(detached)]).to(torch.float32)
        return (mse.mean() if reduce_mean else mse), terms
