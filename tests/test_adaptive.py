"""The `adaptive` strategy: learning-progress sampling set online from the losses it is fed."""
import io
import math

import numpy as np
import pytest
import torch

from speed_kernels import DiffusionLoss
from speed_kernels import strategies as S
from speed_kernels.schedules import NoiseSchedule
from speed_kernels.tables import ROW_CDF, sampling_row

LIN = NoiseSchedule.linear()


def falling_stream(st, steps, rng, falling=(0, 250), batch=64, noise=0.1, start=0):
    """Draw t from the strategy's own table; loss 1 + exp(-s/200) on `falling` steps, 1 elsewhere."""
    tables = []
    for s in range(start, start + steps):
        p = st.probs(LIN).numpy()
        t = rng.choice(LIN.T, batch, p=p)
        base = np.where((t >= falling[0]) & (t < falling[1]), 1.0 + np.exp(-s / 200.0), 1.0)
        st.update(t, base * (1.0 + noise * rng.standard_normal(batch)))
        tables.append(p)
    return tables


def test_registered_and_bad_params():
    assert "adaptive" in S.names()
    assert S.get("adaptive").dynamic
    for kw, word in ((dict(buckets=0), "buckets"), (dict(every=0), "every"), (dict(mix=1.5), "mix"),
                     (dict(fast_steps=300, slow_steps=200), "slow_steps"), (dict(fast_steps=0), "fast_steps"),
                     (dict(warmup_steps=-1), "warmup_steps"), (dict(unbiased="yes"), "unbiased")):
        with pytest.raises(ValueError, match=word):
            S.get("adaptive", **kw)
    st = S.get("adaptive")
    with pytest.raises(ValueError, match="before update"):
        st.update(torch.tensor([1]), torch.tensor([1.0]))
    st.probs(LIN)
    with pytest.raises(ValueError, match="finite"):
        st.update(torch.tensor([1]), torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        st.update(torch.tensor([1000]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="same length"):
        st.update(torch.tensor([1, 2]), torch.tensor([1.0]))


@pytest.mark.parametrize("unbiased", [False, True])
def test_tables_are_valid_distributions_and_weights_unbiased(unbiased):
    st = S.get("adaptive", buckets=16, fast_steps=10, slow_steps=40, every=5, unbiased=unbiased)
    rng = np.random.default_rng(1)
    for p in falling_stream(st, 200, rng):
        assert p.shape == (LIN.T,) and np.all(p >= 0) and abs(p.sum() - 1) < 1e-12
    p = st.probs(LIN).numpy()
    w = st.weights(LIN, "eps").numpy()
    assert not np.allclose(p, 1.0 / LIN.T)  # it has moved
    if unbiased:  # E_p[w·L] = mean_t L for any L
        L = rng.random(LIN.T)
        assert math.isclose((p * w * L).sum(), L.mean(), rel_tol=1e-12)
    else:
        assert np.all(w == 1.0)
    for pred in ("v", "x0"):
        assert np.array_equal(st.weights(LIN, pred).numpy(), w)


def test_moves_mass_to_buckets_whose_loss_still_falls():
    st = S.get("adaptive")  # 20 buckets of 50 steps; the falling region is buckets 0..4
    rng = np.random.default_rng(0)
    tables = falling_stream(st, 150, rng)
    assert np.allclose(tables[-1], 1.0 / LIN.T)  # warm-up (250 steps by default): still uniform
    falling_stream(st, 350, rng, start=150)
    p = st.probs(LIN).numpy()
    share = p[:250].sum()
    # uniform gives 0.25; with mix 0.5 and all progress in the falling region the bound is 0.5 + 0.125
    assert share > 0.5, share
    lp = st.progress()
    assert lp[:5].min() > 5 * lp[5:].max()
    # within a bucket the table is flat
    assert np.allclose(p[:50], p[0])
    # once the loss has stopped falling everywhere, the table drifts back to uniform
    st2 = S.get("adaptive", fast_steps=10, slow_steps=40)
    rng = np.random.default_rng(3)
    falling_stream(st2, 300, rng)
    falling_stream(st2, 400, rng, falling=(0, 0), start=300)
    assert abs(st2.probs(LIN).numpy()[:250].sum() - 0.25) < 0.1


def test_averages_match_a_plain_loop():
    """Step-time EMAs with irregular observations, against a per-bucket Python loop."""
    T, B, tf, ts = 40, 4, 3.0, 9.0
    st = S.get("adaptive", buckets=B, fast_steps=tf, slow_steps=ts, warmup_steps=0, every=1)
    rng = np.random.default_rng(5)
    st.probs(NoiseSchedule.linear(T=T))
    fast, slow, last, seen = [None] * B, [None] * B, [0] * B, [0] * B
    for u in range(1, 61):
        n = int(rng.integers(0, 6))
        t = rng.integers(0, T, n) if u % 7 else rng.integers(0, 10, n)  # bucket 0 only, sometimes
        loss = rng.random(n) * (1 + u / 10)
        st.update(t, loss)
        for b in range(B):
            sel = (t // (T // B)) == b
            if not sel.any():
                continue
            m = float(loss[sel].mean())
            if seen[b] == 0:
                fast[b] = slow[b] = m
            else:
                fast[b] += (1 - math.exp(-(u - last[b]) / tf)) * (m - fast[b])
                slow[b] += (1 - math.exp(-(u - last[b]) / ts)) * (m - slow[b])
            last[b], seen[b] = u, seen[b] + 1
    sd = st.state_dict()
    np.testing.assert_allclose(sd["fast"].numpy(), fast, rtol=1e-12)
    np.testing.assert_allclose(sd["slow"].numpy(), slow, rtol=1e-12)
    assert sd["seen"].tolist() == seen and sd["last"].tolist() == last
    lp = np.maximum(np.array(slow) - np.array(fast), 0) / np.array(slow)
    expect = 0.5 * lp / lp.sum() + 0.5 / B if lp.sum() > 0 else np.full(B, 1 / B)
    np.testing.assert_allclose(sd["table"].numpy(), expect, rtol=1e-12)


def test_state_round_trip_and_resume_gives_identical_tables():
    kw = dict(buckets=10, fast_steps=8, slow_steps=30, every=3)
    straight = S.get("adaptive", **kw)
    t_straight = falling_stream(straight, 120, np.random.default_rng(7))
    first = S.get("adaptive", **kw)
    rng = np.random.default_rng(7)
    t_first = falling_stream(first, 60, rng)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = S.get("adaptive")  # other params: restored from the state
    resumed.load_state_dict(torch.load(buf))
    assert resumed.params == first.params
    a, b = first.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]), k
    t_rest = falling_stream(resumed, 60, rng, start=60)
    for x, y in zip(t_straight, t_first + t_rest):
        assert np.array_equal(x, y)
    assert not np.allclose(t_straight[-1], t_straight[0])
    with pytest.raises(ValueError, match="not 'importance'"):
        S.get("importance").load_state_dict(a)
    bad = dict(a, fast=torch.zeros(3))
    with pytest.raises(ValueError, match="wrong shape"):
        S.get("adaptive").load_state_dict(bad)


def test_diffusion_loss_refreshes_the_table_in_place_and_resumes():
    params = dict(buckets=8, fast_steps=5, slow_steps=20, every=2)

    def make():
        return DiffusionLoss(NoiseSchedule.linear(T=200), strategy="adaptive", strategy_params=params,
                             backend="torch", seed=3)

    def step(fn, x0, s):
        x_t, t = fn.noise(x0)
        # a "model" whose error falls over time only at small t
        scale = torch.where(t < 50, 1.0 + math.exp(-s / 30), torch.ones(()))
        pred = torch.randn(x0.shape, generator=torch.Generator().manual_seed(s)) * scale.view(-1, 1, 1, 1)
        return fn.loss(pred, x0, t).item()

    x0 = torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = make()
    tab = a.tables("cpu")
    ptr = tab.data_ptr()
    losses_a = [step(a, x0, s) for s in range(80)]
    assert a.tables("cpu").data_ptr() == ptr  # updated in place (CUDA-graph safe)
    assert torch.equal(tab[ROW_CDF], sampling_row(a.strategy.probs(a.schedule), a.T).to(tab.dtype))
    assert a.probs_table[:50].sum() > 0.25 + 0.05  # the falling quarter gets more than its uniform share
    b = make()
    losses_b = [step(b, x0, s) for s in range(40)]
    c = make()
    c.load_state_dict(b.state_dict())
    losses_b += [step(c, x0, s) for s in range(40, 80)]
    assert losses_a == losses_b
    assert torch.equal(a.tables("cpu"), c.tables("cpu"))


def test_distributed_trainer_gathers_losses_for_it():
    from speed_train.trainer import _learns_from_losses

    assert _learns_from_losses(S.get("adaptive"))
    assert _learns_from_losses(S.combine("adaptive", "p2"))
