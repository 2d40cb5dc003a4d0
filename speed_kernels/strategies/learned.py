"""Strategies that learn where to train, with their state on the loss's device.

Both keep per-bucket state as tensors on the device the loss runs on, update it in place with
torch ops (no host sync, no data-dependent Python branch) and write their rows of the kernel table
in place, so a compiled step or a captured CUDA graph keeps reading valid tables. Reductions over
the batch are one-hot matrix products, not atomics, so every rank fed the same (t, loss) pairs
computes a bit-identical table.

- ``gradvar``: sampling proportional to each bucket's share of the gradient. For the MSE term
  ℓ = w·mean((pred - target)²) over D values, the per-sample gradient with respect to the model's
  output has ‖∂ℓ/∂pred‖² = 4·w·ℓ/D, so an online estimate of E[ℓ] per bucket gives E‖g‖² per
  bucket and the variance-minimising importance distribution p_b ∝ √E‖g_b‖² ∝ √E[ℓ_b]
  (Katharopoulos & Fleuret 2018: the output gradient bounds the parameter gradient). Kim et al.
  (CVPR 2025) learn a policy network rewarded by the loss decrease over all time steps; this is a
  per-bucket variance proxy without the policy or the cross-step reward. It differs from
  ``importance`` (improved-diffusion: p ∝ √E[ℓ²], a history of 10 losses per step) in the moment
  (E[ℓ], the gradient's second moment, not E[ℓ²]), in following a moving target (an EMA in
  training steps per bucket) and in living on the device.
- ``uncertainty``: EDM2's learned per-noise-level uncertainty. The MSE term becomes
  ℓ_t/e^{u_b} + u_b with u a per-bucket table trained by the model's optimizer (its gradient
  1 - ℓ/e^{u} drives e^{u} to E[ℓ_b]): each bucket's loss is normalised by its own level, so no
  level dominates the gradient. The kernel reads the weight w·e^{-u} from the table (u constant to
  the model); ``extra_loss`` adds u + (e^{-u} - sg(e^{-u}))·sg(ℓ), whose value makes the total
  EDM2's loss and whose gradient reaches u only.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from speed_kernels.rng import uniform_cdf_of
from speed_kernels.schedules import NoiseSchedule
from speed_kernels.strategies.base import Strategy, _number, _whole


def _bucket_edges(T: int, buckets: int) -> np.ndarray:
    """Equal-width buckets over [0, T) (``min(buckets, T)`` of them): bucket b holds edges[b] .. edges[b+1]-1."""
    return np.linspace(0, T, min(buckets, T) + 1).round().astype(np.int64)


def _flag(name: str, v: Any) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {v!r}")
    return bool(v)


class _Bucketed(Strategy):
    """Shared plumbing: the bucket map of a schedule and the device the state lives on."""

    def _setup(self, T: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _ensure(self, T: int, device: Any = None) -> None:
        if getattr(self, "_T", None) is None:
            self._T = int(T)
            self._edges = _bucket_edges(self._T, self.params["buckets"])
            self._B = len(self._edges) - 1
            self._bucket_of = torch.from_numpy(np.searchsorted(self._edges, np.arange(T), side="right") - 1)
            self._sizes = torch.from_numpy(np.diff(self._edges)).to(torch.float64)
            self._setup(self._T)
        elif self._T != T:
            raise ValueError(f"{self.name} strategy holds statistics for T = {self._T}, not T = {T}")
        if device is not None:
            self._move(torch.device(device))

    def _move(self, device: torch.device) -> None:
        """Move every state tensor to ``device`` in place of the attribute (Parameters keep their identity)."""
        for k, v in list(vars(self).items()):
            if isinstance(v, torch.nn.Parameter):
                if v.device != device:
                    v.data = v.data.to(device)
            elif isinstance(v, torch.Tensor) and v.device != device:
                setattr(self, k, v.to(device))

    def _buckets(self, t: torch.Tensor) -> torch.Tensor:
        return self._bucket_of.to(t.device)[t.long()]

    def bucket_edges(self) -> np.ndarray:
        """Bucket b holds the steps edges[b] .. edges[b+1] - 1."""
        if getattr(self, "_T", None) is None:
            raise ValueError(f"{self.name}: no statistics yet (build a table or update with T= first)")
        return self._edges.copy()

    def _per_step(self, pb: torch.Tensor) -> torch.Tensor:
        """A bucket-level distribution spread evenly over each bucket's steps: float64 [T]."""
        return (pb.to(torch.float64) / self._sizes.to(pb.device))[self._bucket_of.to(pb.device)]


# ---------------------------------------------------------------------------- gradvar
class GradVar(_Bucketed):
    """Sampling ∝ each t-bucket's root-mean-square output gradient, learned online on the device.

    Per bucket b an exponential moving average m_b of the unweighted per-sample loss, with time
    constant ``ema_steps`` counted in training steps (one ``update`` is one step; a bucket seen
    after Δ steps moves by 1 - exp(-Δ/τ) towards its samples' mean, as ``adaptive`` does). The
    table is p_b = (1 - mix)·√m_b/Σ√m + mix/B, spread evenly over the bucket's steps: uniform until
    ``warmup_steps`` updates were made and every bucket was seen. ``unbiased=True`` weights each
    sample by 1/(T·p_t), which keeps the objective the uniform one and only lowers the variance of
    its gradient; ``unbiased=False`` (default, weight 1) moves the objective towards the buckets that
    carry the most gradient, a re-sampling strategy like SpeeD's sampling. In a learned-σ run the
    loss fed here includes the VB term. Non-finite losses are ignored (that bucket keeps its value).
    Defaults chosen before any study run: buckets 20, ema_steps 100, mix 0.25, warmup_steps 100.
    """

    name = "gradvar"
    dynamic = True
    device_rows = True

    def __init__(self, buckets: int = 20, ema_steps: float = 100.0, mix: float = 0.25, warmup_steps: int = 100,
                 unbiased: bool = False):
        self.params = {"buckets": _whole("buckets", buckets, lo=1),
                       "ema_steps": _number("ema_steps", ema_steps, lo=0.0, lo_open=True),
                       "mix": _number("mix", mix, lo=0.0, hi=1.0),
                       "warmup_steps": _whole("warmup_steps", warmup_steps, lo=0),
                       "unbiased": _flag("unbiased", unbiased)}
        if self.params["unbiased"] and self.params["mix"] == 0.0:
            raise ValueError("gradvar: unbiased=True needs mix > 0 (every step drawable, finite weights)")
        self._T = None

    def _setup(self, T: int) -> None:
        B = self._B
        self._m = torch.zeros(B, dtype=torch.float64)
        self._last = torch.zeros(B, dtype=torch.int64)
        self._seen = torch.zeros(B, dtype=torch.int64)
        self._updates = 0

    def update(self, t: Any, per_sample_losses: Any, T: int | None = None) -> None:
        """One training step's (t, unweighted loss) pairs (all ranks' in a distributed run), on any device."""
        if T is not None:
            self._ensure(int(T))
        if self._T is None:
            raise ValueError("gradvar: call probs()/weights() with the schedule (or pass T=) before update()")
        t = torch.as_tensor(t)
        loss = torch.as_tensor(per_sample_losses, device=t.device).reshape(-1).to(torch.float64)
        t = t.reshape(-1)
        if t.shape != loss.shape:
            raise ValueError(f"t and per_sample_losses must have the same length, got {t.numel()} and {loss.numel()}")
        self._ensure(self._T, t.device)
        self._updates += 1
        if t.numel() == 0:
            return
        ok = torch.isfinite(loss)
        onehot = (self._buckets(t)[:, None] == torch.arange(self._B, device=t.device)).to(torch.float64)
        onehot = onehot * ok[:, None]
        n = onehot.sum(0)
        mean = (torch.where(ok, loss, 0.0) @ onehot) / n.clamp(min=1.0)
        hit = n > 0
        dt = (self._updates - self._last).to(torch.float64)
        a = -torch.expm1(-dt / self.params["ema_steps"])
        new = torch.where(self._seen == 0, mean, self._m + a * (mean - self._m))
        self._m.copy_(torch.where(hit, new, self._m))
        self._last.copy_(torch.where(hit, torch.full_like(self._last, self._updates), self._last))
        self._seen.add_(hit.to(torch.int64))

    def bucket_probs(self) -> torch.Tensor:
        """p_b on the state's device (float64 [B]): uniform before warm-up."""
        B = self._B
        uniform = torch.full((B,), 1.0 / B, dtype=torch.float64, device=self._m.device)
        root = self._m.clamp(min=0.0).sqrt()
        s = root.sum()
        mix = self.params["mix"]
        learned = (1.0 - mix) * root / s.clamp(min=1e-300) + mix / B
        ready = (self._seen.min() > 0) & (s > 0)
        if self._updates < self.params["warmup_steps"]:
            return uniform
        return torch.where(ready, learned, uniform)

    def _probs(self, schedule, step):
        self._ensure(schedule.T)
        return self._per_step(self.bucket_probs()).cpu().numpy()

    def _weights(self, schedule, prediction):
        if not self.params["unbiased"]:
            return np.ones(schedule.T)
        return (1.0 / (schedule.T * self._per_step(self.bucket_probs()))).cpu().numpy()

    def write_cdf_(self, row: torch.Tensor, schedule: NoiseSchedule, step: int = 0) -> None:
        self._ensure(schedule.T, row.device)
        row.copy_(uniform_cdf_of(self._per_step(self.bucket_probs())))

    def write_weight_(self, row: torch.Tensor, schedule: NoiseSchedule, prediction: str = "eps") -> None:
        self._ensure(schedule.T, row.device)
        if self.params["unbiased"]:
            row.copy_(1.0 / (schedule.T * self._per_step(self.bucket_probs())))
        else:
            row.fill_(1.0)

    def state_dict(self) -> dict:
        d = super().state_dict()
        d["T"] = self._T
        if self._T is not None:
            d.update(m=self._m.detach().cpu().clone(), last=self._last.cpu().clone(), seen=self._seen.cpu().clone(),
                     updates=int(self._updates))
        return d

    def load_state_dict(self, d: Mapping) -> None:
        super().load_state_dict(d)
        device = self._m.device if getattr(self, "_T", None) is not None else None
        self._T = None
        if d.get("T") is None:
            return
        self._ensure(int(d["T"]))
        arrs = {"m": torch.float64, "last": torch.int64, "seen": torch.int64}
        for k, dtype in arrs.items():
            v = torch.as_tensor(d[k]).to("cpu", dtype).clone()
            if v.shape != (self._B,):
                raise ValueError(f"gradvar state_dict has {k} of shape {tuple(v.shape)}, expected ({self._B},)")
            setattr(self, f"_{k}", v)
        self._updates = int(d["updates"])
        if device is not None:
            self._move(device)


# ---------------------------------------------------------------------------- uncertainty
class Uncertainty(_Bucketed):
    """EDM2's learned uncertainty weighting: the MSE term ℓ becomes ℓ/e^{u_b} + u_b.

    u is a per-bucket table (``buckets`` equal-width buckets of t, zeros at the start, so training
    starts as the plain MSE) trained by the model's optimizer: pass ``loss_fn.parameters(device)``
    to it (the training engine does); its learning rate is the model's times ``lr_scale`` (the
    engine makes it a parameter group of its own, no weight decay) so that e^{u} can follow a loss
    that falls by orders of magnitude within a short run. Sampling is uniform; ``speed+uncertainty``
    is SpeeD's sampling with these weights. The weight row is e^{-u_b(t)}, rewritten in place on the
    device before every draw (no host sync). The VB term of a learned-σ loss is not reweighted.
    Defaults chosen before any study run: buckets 20, lr_scale 10.
    """

    name = "uncertainty"
    dynamic = True
    device_rows = True

    def __init__(self, buckets: int = 20, lr_scale: float = 10.0):
        self.params = {"buckets": _whole("buckets", buckets, lo=1),
                       "lr_scale": _number("lr_scale", lr_scale, lo=0.0, lo_open=True)}
        self._T = None
        self._u: torch.nn.Parameter | None = None

    def _setup(self, T: int) -> None:
        self._u = torch.nn.Parameter(torch.zeros(self._B, dtype=torch.float32))
        self._u.lr_scale = self.params["lr_scale"]  # read by the training engine's parameter group

    def parameters(self, device: Any = None, T: int = 1000) -> list:
        """[u] (float32 [B]), on ``device`` (moved in place). T: the schedule's length, needed only
        before the first table was built (the loss object has built it by then)."""
        self._ensure(self._T if self._T is not None else int(T), device)
        return [self._u]

    def uncertainty(self) -> torch.Tensor:
        """u per bucket (a detached float64 copy on the CPU)."""
        if self._T is None:
            raise ValueError("uncertainty: no table yet (build a table first)")
        return self._u.detach().to("cpu", torch.float64).clone()

    def _u_of_t(self, device: Any = None) -> torch.Tensor:
        u = self._u.detach()
        return u.to(torch.float64)[self._bucket_of.to(u.device)]

    def _weights(self, schedule, prediction):
        self._ensure(schedule.T)
        return torch.exp(-self._u_of_t()).cpu().numpy()

    def write_cdf_(self, row, schedule, step=0):  # uniform sampling: the row built with the table stays
        self._ensure(schedule.T, row.device)

    def write_weight_(self, row: torch.Tensor, schedule: NoiseSchedule, prediction: str = "eps") -> None:
        self._ensure(schedule.T, row.device)
        row.copy_(torch.exp(-self._u_of_t()))

    def extra_loss(self, t: torch.Tensor, weighted_mse: torch.Tensor) -> torch.Tensor:
        """u_b + (e^{-u_b} - sg(e^{-u_b}))·sg(ℓ) per sample, ℓ the MSE term before the e^{-u} factor:
        the value makes the total ℓ/e^{u} + u, the gradient reaches u only (1 - ℓ/e^{u})."""
        self._ensure(self._T, t.device)
        u = self._u[self._buckets(t)]
        inv = torch.exp(-u)
        plain = (weighted_mse.detach().float() * torch.exp(u.detach())).nan_to_num(nan=0.0, posinf=0.0)
        return u + (inv - inv.detach()) * plain

    def state_dict(self) -> dict:
        d = super().state_dict()
        d["T"] = self._T
        if self._T is not None:
            d["u"] = self._u.detach().cpu().clone()
        return d

    def load_state_dict(self, d: Mapping) -> None:
        super().load_state_dict(d)  # (a params change re-inits: a fresh table)
        if d.get("T") is None:
            return
        if self._T is None:
            self._ensure(int(d["T"]))
        elif self._T != int(d["T"]):
            raise ValueError(f"uncertainty state_dict is for T = {d['T']}, not T = {self._T}")
        u = torch.as_tensor(d["u"]).float()
        if u.shape != self._u.shape:
            raise ValueError(f"uncertainty state_dict has u of shape {tuple(u.shape)}, expected {tuple(self._u.shape)}")
        with torch.no_grad():  # in place: the optimizer keeps holding this Parameter
            self._u.copy_(u.to(self._u.device))
