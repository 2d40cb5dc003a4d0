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
                     (dict(warmup_steps=-1), "warmup_steps"), (dict(unbiased="yes"), "unbiased"),
                     (dict(relative=1), "relative")):
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
    # relative=False: the fall in loss units, recomputed from the same averages
    st.params["relative"] = False
    fall = np.maximum(np.array(slow) - np.array(fast), 0)
    np.testing.assert_allclose(st.progress(), fall, rtol=1e-12)
    st.params["relative"] = True


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


# ---------------------------------------------------------------------------- data-aware analysis
from speed_kernels.analysis import areas  # noqa: E402
from speed_kernels.data_analysis import data_areas, data_spectrum, recommend_k  # noqa: E402


def _first_t_with_snr_below(sched, level):
    """Independent search: the first t with SNR_t <= level, from ᾱ computed here."""
    abar = np.cumprod(1.0 - sched.betas.numpy().astype(np.float64))
    for t in range(sched.T):
        if abar[t] / (1 - abar[t]) <= level:
            return t
    return None


@pytest.mark.parametrize("sched", [NoiseSchedule.linear(), NoiseSchedule.cosine()], ids=lambda s: s.name)
def test_white_unit_data_gives_the_schedule_tau_and_scaled_data_moves_it(sched):
    rng = np.random.default_rng(0)
    tau0 = areas(sched)["tau"]
    # a known spectrum: one direction of variance c^2 (in a random orthonormal basis), the rest 0.01
    d, n = 48, 20000
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    for c2 in (1.0, 30.0, 0.05):
        std = np.full(d, 0.1)
        std[0] = math.sqrt(c2)
        x = (rng.standard_normal((n, d)) * std) @ q.T + 3.0  # a mean offset: ignored
        rep = data_areas(x.reshape(n, 3, 4, 4), sched)
        assert rep["lambda_max"] == pytest.approx(c2, rel=0.05)
        abar = np.cumprod(1.0 - sched.betas.numpy().astype(np.float64))
        thr = abar[tau0 - 1] / (1 - abar[tau0 - 1])
        lo = _first_t_with_snr_below(sched, thr / (rep["lambda_max"] * (1 - 1e-9)))
        expect = sched.T if lo is None else lo + 1
        assert abs(rep["tau_data"] - expect) <= 1
        if c2 == 1.0:
            assert abs(rep["tau_data"] - tau0) <= 3  # unit top variance: the schedule's own rule
        elif c2 > 1:
            assert rep["tau_data"] > tau0 + min(20, (sched.T - tau0) // 2)
        else:
            assert rep["tau_data"] < tau0
        assert rep["k"] == recommend_k(rep["tau_data"], sched.T)


def test_spectrum_matches_numpy_and_power_iteration_agrees():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 30)) * np.linspace(0.1, 2.0, 30)
    spec = data_spectrum(x)
    ref = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
    np.testing.assert_allclose(spec["eigenvalues"], ref, rtol=1e-10, atol=1e-12)
    big = data_spectrum(x, max_dims=10)  # power iteration path
    assert big["eigenvalues"] is None and big["lambda_max"] == pytest.approx(ref[0], rel=1e-6)
    few = data_spectrum(x[:10])  # fewer examples than dimensions: Gram matrix
    ref_few = np.sort(np.linalg.eigvalsh(np.cov(x[:10], rowvar=False)))[::-1][:10]
    np.testing.assert_allclose(few["eigenvalues"], ref_few, rtol=1e-8, atol=1e-10)
    # rotating the data (a change of orthonormal basis) does not change the answer
    q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    a, b = data_areas(x, LIN), data_areas(x @ q, LIN)
    assert a["tau_data"] == b["tau_data"] and a["lambda_max"] == pytest.approx(b["lambda_max"], rel=1e-9)
    # information is positive and falls with t
    assert np.all(np.diff(a["info_nats"]) <= 1e-12) and a["info_nats"][-1] >= 0


def test_std_about_the_mean_example_and_over_all_values():
    # per-value offsets (a "mean image") add to the all-values std, not to the spectrum's std
    rng = np.random.default_rng(2)
    noise = rng.standard_normal((400, 16)) * 0.5
    offsets = np.linspace(-2.0, 2.0, 16)
    spec = data_spectrum(noise + offsets)
    assert spec["std"] == pytest.approx(math.sqrt(np.var(noise, axis=0, ddof=1).mean()), rel=1e-9)
    assert spec["std_all"] == pytest.approx(float((noise + offsets).std(ddof=1)), rel=1e-12)
    assert spec["std_all"] > 2 * spec["std"]
    plain = data_spectrum(noise)
    assert plain["std"] == pytest.approx(spec["std"], rel=1e-12)  # the offsets leave the spectrum alone


def test_recommend_k_and_bad_data():
    assert recommend_k(700, 1000) == 5 and recommend_k(1000, 1000) == 1 and recommend_k(850, 1000) == 3
    with pytest.raises(ValueError, match="zero variance"):
        data_areas(np.ones((10, 4)), LIN)
    with pytest.raises(ValueError, match="non-finite"):
        data_areas(np.full((10, 4), np.nan), LIN)
    with pytest.raises(TypeError, match="data"):
        data_areas([[1.0, 2.0]], LIN)
    with pytest.raises(ValueError, match="at least 2"):
        data_areas(np.ones((1, 4)), LIN)
    with pytest.raises(TypeError, match="schedule"):
        data_areas(np.random.rand(10, 4), "linear")


def test_analyze_cli_reports_the_data_tau(capsys):
    import json as _json

    from speed_train.cli import main  # dataset names are read through the application's loader

    assert main(["analyze", "--data", "digits", "--json"]) == 0
    out = _json.loads(capsys.readouterr().out)
    assert out["data"]["tau_schedule"] == 700 and out["data"]["tau_data"] >= 700
    assert main(["analyze", "--data", "digits"]) == 0
    assert "this data's tau" in capsys.readouterr().out


def test_library_analyze_reads_arrays_and_names_the_limit(tmp_path, capsys):
    import numpy as _np

    from speed_kernels.analysis import main

    _np.save(tmp_path / "d.npy", _np.random.default_rng(0).normal(size=(200, 16)) * 3.0)
    assert main(["analyze", "--data", str(tmp_path / "d.npy"), "--json"]) == 0
    assert "tau_data" in capsys.readouterr().out
    assert main(["analyze", "--data", "digits", "--json"]) == 2  # one-line user error, no traceback
    assert "dataset names need the `speed-kernels` command" in capsys.readouterr().err


def test_adaptive_is_retired_and_says_so_when_built():
    from speed_kernels import strategies as S

    with pytest.warns(FutureWarning, match="retired"):
        S.get("adaptive")
