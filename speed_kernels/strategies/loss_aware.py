"""Strategies that learn from the losses on the host: loss-aware importance sampling
(improved-diffusion) and `adaptive` (learning progress per t-bucket)."""
from __future__ import annotations

import math
import warnings
from typing import Any, Mapping

import numpy as np
import torch

from speed_kernels.strategies.base import Strategy, _normalise, _number


def _loss_pairs(t, per_sample_losses) -> tuple:
    """(t int64, losses float64) host arrays of one update() call of a loss-learning strategy,
    checked: equal lengths, finite losses."""
    tt = (t.detach().to("cpu", torch.int64).numpy() if isinstance(t, torch.Tensor)
          else np.asarray(t, dtype=np.int64)).reshape(-1)
    ll = (per_sample_losses.detach().to("cpu", torch.float64).numpy() if isinstance(per_sample_losses, torch.Tensor)
          else np.asarray(per_sample_losses, dtype=np.float64)).reshape(-1)
    if tt.shape != ll.shape:
        raise ValueError(f"t and per_sample_losses must have the same length, got {tt.shape[0]} and {ll.shape[0]}")
    if not np.all(np.isfinite(ll)):
        raise ValueError("per_sample_losses must be finite")
    return tt, ll


class Importance(Strategy):
    """Loss-aware importance sampling (improved-diffusion's LossSecondMomentResampler).

    Keeps the last ``history`` losses of every t. Until every t has ``history`` of them, sampling is
    uniform and weights are 1. Then p_t ∝ √mean(loss_t²), mixed: p ← p·(1 - uniform_prob) +
    uniform_prob/T, and the weights are 1/(T·p_t), which keep the loss unbiased:
    Σ_t p_t w_t L_t = mean_t L_t. The weights do not depend on the prediction target.
    State (buffers, counts) is in ``state_dict``. ``update(t, losses)`` is vectorised over the batch
    (a step seen several times in one batch keeps its last ``history`` values, in batch order)."""

    name = "importance"
    dynamic = True

    def __init__(self, history: int = 10, uniform_prob: float = 0.001):
        if isinstance(history, bool) or not isinstance(history, (int, np.integer)) or history < 1:
            raise ValueError(f"history must be a positive integer, got {history!r}")
        self.params = {"history": int(history), "uniform_prob": _number("uniform_prob", uniform_prob, lo=0.0, hi=1.0)}
        self._state_T: int | None = None
        self._state_buf: np.ndarray | None = None  # [T, history], ring buffer
        self._state_count: np.ndarray | None = None  # [T] int64, losses seen (total, not capped)

    def _ensure(self, T: int) -> None:
        if self._state_T is None:
            self._state_T = T
            self._state_buf = np.zeros((T, self.params["history"]), dtype=np.float64)
            self._state_count = np.zeros(T, dtype=np.int64)
        elif self._state_T != T:
            raise ValueError(f"importance strategy holds a history for T = {self._state_T}, not T = {T}")

    def warmed_up(self) -> bool:
        return self._state_count is not None and bool(np.all(self._state_count >= self.params["history"]))

    def update(self, t: Any, per_sample_losses: Any, T: int | None = None) -> None:
        """Record losses. ``T`` is needed only before the first table was built (else inferred)."""
        tt, ll = _loss_pairs(t, per_sample_losses)
        if T is not None:
            self._ensure(int(T))
        if self._state_T is None:
            raise ValueError("importance: call probs()/weights() with the schedule (or pass T=) before update()")
        T = self._state_T
        if tt.size and (tt.min() < 0 or tt.max() >= T):
            raise ValueError(f"t must lie in [0, {T - 1}]")
        if tt.size == 0:
            return
        H = self.params["history"]
        order = np.argsort(tt, kind="stable")
        ts, ls = tt[order], ll[order]
        starts = np.r_[0, np.flatnonzero(np.diff(ts)) + 1]
        group_sizes = np.diff(np.r_[starts, ts.size])
        rank = np.arange(ts.size) - np.repeat(starts, group_sizes)
        size = np.repeat(group_sizes, group_sizes)
        keep = rank >= size - H  # only the last H values of a step in this batch survive
        ts, ls, rank = ts[keep], ls[keep], rank[keep]
        slot = (self._state_count[ts] + rank) % H
        self._state_buf[ts, slot] = ls
        np.add.at(self._state_count, tt, 1)

    def _current(self, T: int) -> np.ndarray:
        self._ensure(T)
        if not self.warmed_up():
            return np.full(T, 1.0 / T)
        p = np.sqrt(np.mean(self._state_buf ** 2, axis=1))
        s = p.sum()
        p = p / s if s > 0 else np.full(T, 1.0 / T)
        u = self.params["uniform_prob"]
        return p * (1.0 - u) + u / T

    def _probs(self, schedule, step):
        return self._current(schedule.T)

    def _weights(self, schedule, prediction):
        p = self._current(schedule.T)
        if not self.warmed_up():
            return np.ones(schedule.T)
        p = p / p.sum()
        if np.any(p <= 0):
            raise ValueError("importance: a step has probability 0 (uniform_prob = 0 and a zero loss history); "
                             "use uniform_prob > 0")
        return 1.0 / (schedule.T * p)

    def state_dict(self) -> dict:
        d = super().state_dict()
        d["T"] = self._state_T
        d["buffer"] = None if self._state_buf is None else torch.from_numpy(self._state_buf.copy())
        d["count"] = None if self._state_count is None else torch.from_numpy(self._state_count.copy())
        return d

    def load_state_dict(self, d: Mapping) -> None:
        super().load_state_dict(d)
        if d.get("T") is None:
            self._state_T = self._state_buf = self._state_count = None
            return
        buf = torch.as_tensor(d["buffer"], dtype=torch.float64).cpu().numpy().copy()
        cnt = torch.as_tensor(d["count"], dtype=torch.int64).cpu().numpy().copy()
        T = int(d["T"])
        if buf.shape != (T, self.params["history"]) or cnt.shape != (T,):
            raise ValueError("importance state_dict has buffers of the wrong shape for its T and history")
        self._state_T, self._state_buf, self._state_count = T, buf, cnt


# ---------------------------------------------------------------------------- adaptive
class Adaptive(Strategy):
    """Learning-progress sampling: more draws where the loss is still falling, set online.

    Retired (constructing it warns): the regime study found it slower than uniform in every regime
    and ``benchmarks/adaptive_diagnosis.py`` why (README, "Why adaptive cannot work"). It stays
    registered so that the study's records can be reproduced.

    The T steps are cut into ``buckets`` equal-width buckets (the last one takes the remainder;
    ``min(buckets, T)`` of them). For every bucket b the strategy keeps two exponential moving
    averages of the unweighted per-sample loss it is fed, one fast and one slow, with time
    constants ``fast_steps`` and ``slow_steps`` counted in *training steps* (one ``update`` call is
    one step): a bucket seen after Δ steps moves its average by 1 - exp(-Δ/τ) towards the mean
    loss of its samples in that step, so a rarely drawn bucket is not made to look slower. For a
    loss falling at a steady rate the slow average lags the fast one by about rate·(τ_slow - τ_fast),
    so the learning progress of a bucket is its relative fall

        LP_b = max(0, slow_b - fast_b) / slow_b      (``relative=False``: max(0, slow_b - fast_b))

    The relative form makes buckets with very different loss levels comparable (ε-prediction losses
    span orders of magnitude over t); in the first few hundred steps of a run it favours large t, where
    the ε loss collapses from its initial level fastest (unet-tiny on digits, 300 steps: 37 % of the
    mass at t ≥ 700). The absolute form favours buckets whose loss falls by the most in loss units,
    usually the small t of an ε-prediction model. Which is better is what the regime study measures;
    the default is the relative form, chosen before any study run. The sampling table is a mixture
    with uniform at bucket level:

        p_b = (1 - mix)·LP_b / Σ LP + mix / B        (uniform when Σ LP = 0),

    spread evenly over the steps of each bucket (p_t = p_b·|bucket|/T-normalised, see ``_probs``).
    The ``mix`` share keeps every bucket drawn, so its progress is still measured and a bucket that
    starts falling again is found. The table is uniform until ``warmup_steps`` updates have been made
    and every bucket has been seen at least once (``warmup_steps=None``: ``slow_steps``, so the slow
    average has settled), and is recomputed every ``every`` updates only (between two recomputations
    the device table, which ``DiffusionLoss.refresh_tables`` copies in place, stays fixed).

    Unbiasedness: ``unbiased=False`` (default) uses weight 1, a re-sampling strategy like SpeeD's
    sampling, CLTS or Kim et al.'s adaptive sampler: the objective itself moves towards the buckets
    that are still improving. ``unbiased=True`` uses importance weights w_t = 1/(T·p_t), so the
    expected loss stays the uniform one (Σ_t p_t·w_t·L_t = mean_t L_t) and only the variance of the
    estimate changes, as ``importance`` does. Either way the weights do not depend on the target.

    It learns from the losses ``DiffusionLoss`` feeds it (unweighted, so the weights do not feed
    back into what it measures); a distributed trainer feeds every rank the gathered (t, loss) of
    all ranks in rank order, so every rank computes the same table. All state (averages, last-seen
    steps, counters, the current table) is in ``state_dict``: a resumed run continues with the
    identical table. The defaults are a first reasonable choice, not tuned on any quality metric.
    Non-finite losses are a ``ValueError``.
    """

    name = "adaptive"
    dynamic = True

    def __init__(self, buckets: int = 20, fast_steps: float = 50.0, slow_steps: float = 250.0, mix: float = 0.5,
                 warmup_steps: int | None = None, every: int = 10, unbiased: bool = False,
                 relative: bool = True):
        for arg, v in (("buckets", buckets), ("every", every)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{arg} must be a positive integer, got {v!r}")
        fast = _number("fast_steps", fast_steps, lo=0.0, lo_open=True)
        slow = _number("slow_steps", slow_steps, lo=0.0, lo_open=True)
        if not slow > fast:
            raise ValueError(f"slow_steps must be larger than fast_steps, got slow_steps={slow_steps!r}, "
                             f"fast_steps={fast_steps!r}")
        if warmup_steps is not None and (isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, np.integer))
                                         or warmup_steps < 0):
            raise ValueError(f"warmup_steps must be a non-negative integer or None, got {warmup_steps!r}")
        for arg, v in (("unbiased", unbiased), ("relative", relative)):
            if not isinstance(v, (bool, np.bool_)):
                raise ValueError(f"{arg} must be True or False, got {v!r}")
        self.params = {"buckets": int(buckets), "fast_steps": fast, "slow_steps": slow,
                       "mix": _number("mix", mix, lo=0.0, hi=1.0),
                       "warmup_steps": None if warmup_steps is None else int(warmup_steps),
                       "every": int(every), "unbiased": bool(unbiased), "relative": bool(relative)}
        self._state_T: int | None = None
        warnings.warn("the 'adaptive' strategy is retired: it was slower than uniform in every regime of the "
                      "study (README, 'Why adaptive cannot work'); it is kept to reproduce those records. For "
                      "latent DiT training start with speed+uncertainty or speed+p2", FutureWarning, stacklevel=2)

    # state ------------------------------------------------------------------------------
    def _ensure(self, T: int) -> None:
        if self._state_T is None:
            B = min(self.params["buckets"], T)
            self._state_T = T
            self._edges = np.linspace(0, T, B + 1).round().astype(np.int64)
            self._bucket_of = np.searchsorted(self._edges, np.arange(T), side="right") - 1
            self._fast = np.zeros(B)
            self._slow = np.zeros(B)
            self._last = np.zeros(B, dtype=np.int64)  # update index at which each bucket was last seen
            self._seen = np.zeros(B, dtype=np.int64)  # steps in which each bucket had samples
            self._updates = 0
            self._pb = np.full(B, 1.0 / B)  # the current bucket-level table
        elif self._state_T != T:
            raise ValueError(f"adaptive strategy holds statistics for T = {self._state_T}, not T = {T}")

    def warmed_up(self) -> bool:
        if self._state_T is None:
            return False
        w = self.params["warmup_steps"]
        w = int(math.ceil(self.params["slow_steps"])) if w is None else w
        return self._updates >= w and bool(np.all(self._seen > 0))

    def progress(self) -> np.ndarray:
        """LP_b per bucket (float64 [B]); zeros before the first update."""
        if self._state_T is None:
            raise ValueError("adaptive: no statistics yet (build a table or update with T= first)")
        fall = np.maximum(self._slow - self._fast, 0.0)
        if not self.params["relative"]:
            return np.where(self._seen > 0, fall, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            lp = np.where(self._slow > 0, fall / self._slow, 0.0)
        return np.where(self._seen > 0, lp, 0.0)

    def bucket_edges(self) -> np.ndarray:
        """Bucket b holds the steps edges[b] .. edges[b+1] - 1."""
        if self._state_T is None:
            raise ValueError("adaptive: no statistics yet (build a table or update with T= first)")
        return self._edges.copy()

    def _recompute(self) -> None:
        B = self._fast.shape[0]
        if not self.warmed_up():
            self._pb = np.full(B, 1.0 / B)
            return
        lp = self.progress()
        s = lp.sum()
        mix = self.params["mix"]
        self._pb = (1.0 - mix) * lp / s + mix / B if s > 0 else np.full(B, 1.0 / B)

    def update(self, t: Any, per_sample_losses: Any, T: int | None = None) -> None:
        """One training step's (t, unweighted loss) pairs (all ranks' in a distributed run).
        ``T`` is needed only before the first table was built."""
        tt, ll = _loss_pairs(t, per_sample_losses)
        if T is not None:
            self._ensure(int(T))
        if self._state_T is None:
            raise ValueError("adaptive: call probs()/weights() with the schedule (or pass T=) before update()")
        if tt.size and (tt.min() < 0 or tt.max() >= self._state_T):
            raise ValueError(f"t must lie in [0, {self._state_T - 1}]")
        self._updates += 1
        if tt.size:
            B = self._fast.shape[0]
            b = self._bucket_of[tt]
            n = np.bincount(b, minlength=B)
            hit = n > 0
            mean = np.bincount(b, weights=ll, minlength=B)[hit] / n[hit]
            first = hit & (self._seen == 0)
            dt = (self._updates - self._last[hit]).astype(np.float64)
            for ema, tau in ((self._fast, self.params["fast_steps"]), (self._slow, self.params["slow_steps"])):
                a = -np.expm1(-dt / tau)  # 1 - exp(-Δ/τ): the step-time EMA for irregular observations
                ema[hit] += a * (mean - ema[hit])
                ema[first] = mean[first[hit]]  # first observation: start both averages at it
            self._last[hit] = self._updates
            self._seen[hit] += 1
        if self._updates % self.params["every"] == 0:
            self._recompute()

    def state_dict(self) -> dict:
        d = super().state_dict()
        d["T"] = self._state_T
        if self._state_T is not None:
            d.update(fast=torch.from_numpy(self._fast.copy()), slow=torch.from_numpy(self._slow.copy()),
                     last=torch.from_numpy(self._last.copy()), seen=torch.from_numpy(self._seen.copy()),
                     updates=int(self._updates), table=torch.from_numpy(self._pb.copy()))
        return d

    def load_state_dict(self, d: Mapping) -> None:
        super().load_state_dict(d)
        self._state_T = None
        if d.get("T") is None:
            return
        self._ensure(int(d["T"]))
        B = self._fast.shape[0]
        arrs = {k: torch.as_tensor(d[k]).cpu().numpy().copy() for k in ("fast", "slow", "last", "seen", "table")}
        if any(a.shape != (B,) for a in arrs.values()):
            raise ValueError(f"adaptive state_dict has arrays of the wrong shape for {B} buckets")
        self._fast, self._slow = arrs["fast"].astype(np.float64), arrs["slow"].astype(np.float64)
        self._last, self._seen = arrs["last"].astype(np.int64), arrs["seen"].astype(np.int64)
        self._pb = arrs["table"].astype(np.float64)
        self._updates = int(d["updates"])

    # tables -----------------------------------------------------------------------------
    def _probs(self, schedule, step):
        self._ensure(schedule.T)
        sizes = np.diff(self._edges)
        return (self._pb / sizes)[self._bucket_of]

    def _weights(self, schedule, prediction):
        if not self.params["unbiased"]:
            return np.ones(schedule.T)
        p = _normalise(self._probs(schedule, 0), self.name)
        if np.any(p <= 0):
            raise ValueError("adaptive: unbiased=True needs every step drawable; use mix > 0")
        return 1.0 / (schedule.T * p)
