import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from speed_kernels import strategies as S
from speed_kernels.schedules import NoiseSchedule

LIN = NoiseSchedule.linear()
ZSNR = NoiseSchedule.linear().rescale_zero_terminal_snr()
SCHEDULES = [LIN, NoiseSchedule.cosine(), NoiseSchedule.scaled_linear(), ZSNR, NoiseSchedule.linear(T=64)]


def abar_np(s):
    b = s.betas.numpy()
    return np.cumprod(1.0 - b)


def snr_np(s):
    a = abar_np(s)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > 0, a / (1 - a), 0.0)


def test_names_and_unknown():
    expected = {"uniform", "speed", "p2", "min-snr", "lognormal", "clts", "logit-normal", "importance", "speed-v1"}
    assert expected <= set(S.names())
    with pytest.raises(ValueError) as e:
        S.get("nope")
    for n in expected:
        assert n in str(e.value)
    with pytest.raises(ValueError, match="no parameter"):
        S.get("p2", kk=1)
    with pytest.raises(ValueError, match="no parameters"):
        S.get("uniform", k=1)


@pytest.mark.parametrize("name", sorted(set(S.names())))
@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: f"{s.name}{s.T}")
def test_every_table_is_valid(name, sched):
    params = {"tau": "auto"} if name == "speed" else {}
    st = S.get(name, **params)
    for step in (0, 25000, 10 ** 6):
        p = st.probs(sched, step=step)
        assert p.dtype == torch.float64 and p.shape == (sched.T,)
        assert (p >= 0).all() and abs(p.sum().item() - 1) < 1e-12
    for pred in ("eps", "v", "x0"):
        w = st.weights(sched, prediction=pred)
        assert w.dtype == torch.float64 and w.shape == (sched.T,)
        assert torch.isfinite(w).all() and (w >= 0).all()
    assert isinstance(st.name, str) and isinstance(st.params, dict)
    assert isinstance(st.dynamic, bool) and isinstance(st.mirror, bool)
    assert 0 <= st.pivot(sched) <= sched.T - 1
    assert st.name in repr(st)


def test_bad_prediction_and_schedule():
    st = S.get("p2")
    with pytest.raises(ValueError, match="prediction"):
        st.weights(LIN, prediction="score")
    with pytest.raises(TypeError, match="schedule"):
        st.probs(np.ones(10))
    with pytest.raises(ValueError, match="step"):
        st.probs(LIN, step=-1)


def test_uniform():
    st = S.get("uniform")
    assert torch.allclose(st.probs(LIN), torch.full((1000,), 1e-3, dtype=torch.float64))
    assert (st.weights(LIN, "v") == 1).all()
    assert not st.dynamic and not st.mirror


# ---------------------------------------------------------------------------- SpeeD
def test_speed_code_variant_known_values():
    st = S.get("speed")
    assert st.params == {"k": 5.0, "lam": 0.6, "tau": 700, "variant": "code", "mirror": None}
    assert st.mirror and not st.dynamic
    p = st.probs(LIN).numpy()
    assert p[0] == pytest.approx(5 / (5 * 700 + 300), rel=1e-12)
    assert p[999] == pytest.approx(1 / (5 * 700 + 300), rel=1e-12)
    assert p[699] / p[700] == pytest.approx(5.0)
    assert p[:700].sum() == pytest.approx(3500 / 3800)
    w = st.weights(LIN).numpy()
    assert w[:700].min() == pytest.approx(0.407, abs=5e-4)
    assert w[:700].max() == pytest.approx(0.600, abs=1e-9)
    assert abs(int(np.argmax(w[:700])) - 219) <= 1
    assert (w[700:] == 1.0).all()
    assert st.pivot(LIN) == 642
    # independent CAW
    g = np.gradient(1 - abar_np(LIN))
    gh = (g - g.min()) / (g.max() - g.min())
    np.testing.assert_allclose(w[:700], 0.4 + 0.2 * gh[:700], rtol=1e-12)
    # the same table for every target
    assert torch.equal(st.weights(LIN, "v"), st.weights(LIN, "eps"))
    assert torch.equal(st.weights(LIN, "x0"), st.weights(LIN, "eps"))


def test_speed_paper_variant_and_mirror_override():
    st = S.get("speed", variant="paper")
    assert not st.mirror
    w = st.weights(LIN).numpy()
    g = np.gradient(1 - abar_np(LIN))
    gh = (g - g.min()) / (g.max() - g.min())
    np.testing.assert_allclose(w, 0.4 + 0.2 * gh, rtol=1e-12)
    assert w[999] == pytest.approx(0.4, abs=1e-3)
    assert S.get("speed", variant="paper", mirror=True).mirror
    assert not S.get("speed", mirror=False).mirror
    assert torch.equal(st.probs(LIN), S.get("speed").probs(LIN))


def test_speed_tau_auto_and_k1_uniform():
    st = S.get("speed", tau="auto")
    assert torch.equal(st.probs(LIN), S.get("speed", tau=700).probs(LIN))
    p = S.get("speed", k=1).probs(LIN)
    assert torch.allclose(p, torch.full_like(p, 1e-3))
    # tau = 0 and tau = T are allowed
    assert S.get("speed", tau=0).probs(LIN).sum().item() == pytest.approx(1)
    assert (S.get("speed", tau=1000).weights(LIN) < 1).all()


@pytest.mark.parametrize("kw,arg", [
    ({"k": 0.5}, "k"), ({"lam": 0.4}, "lam"), ({"lam": 1.2}, "lam"), ({"tau": -1}, "tau"), ({"tau": "soon"}, "tau"),
    ({"variant": "blog"}, "variant"), ({"k": float("nan")}, "k"), ({"mirror": "yes"}, "mirror"),
])
def test_speed_validation(kw, arg):
    with pytest.raises(ValueError, match=arg):
        S.get("speed", **kw)


def test_speed_tau_beyond_T_checked_when_table_built():
    st = S.get("speed", tau=1500)
    with pytest.raises(ValueError, match="tau"):
        st.probs(LIN)
    with pytest.raises(ValueError, match="tau"):
        st.weights(LIN)
    st.probs(NoiseSchedule.linear(T=2000))  # fine there


def test_speed_v1():
    st = S.get("speed-v1")
    assert st.mirror and st.pivot(LIN) == 642
    p = st.probs(LIN).numpy()
    assert p[0] / p[999] == pytest.approx(5.0, rel=1e-6)
    assert p[:635].min() / p[650:].max() == pytest.approx(5.0, rel=1e-3)
    g = np.gradient(np.sqrt(1 - abar_np(LIN)))
    q = np.tanh(1e6 * (g - 1e-4)) + 1.5
    np.testing.assert_allclose(p, q / q.sum(), rtol=1e-12)
    a = abar_np(LIN)
    np.testing.assert_allclose(st.weights(LIN).numpy(), 1 - a, rtol=1e-9)
    assert torch.allclose(st.weights(LIN, "x0"), S.get("p2").weights(LIN, "x0"))


def test_mirror_distribution():
    p = S.get("speed").probs(LIN)
    m = S.mirror_probs(p, 642).numpy()
    pn = p.numpy()
    expect = np.zeros(1000)
    for t in range(1000):
        expect[abs(t - 642)] += pn[t]
    np.testing.assert_allclose(m, expect, rtol=1e-12)
    eff = S.effective_probs(p, 642).numpy()
    assert eff[:700].sum() == pytest.approx(0.5 * 3500 / 3800 + 0.5)  # ~96 %
    # exact batch: B = 4 -> 3 drawn, 1 mirrored
    eff4 = S.effective_probs(p, 642, batch_size=4).numpy()
    np.testing.assert_allclose(eff4, 0.75 * pn + 0.25 * expect, rtol=1e-12)
    with pytest.raises(ValueError, match="pivot"):
        S.mirror_probs(p, 1000)


# ---------------------------------------------------------------------------- P2 / Min-SNR
@pytest.mark.parametrize("k,gamma", [(1.0, 1.0), (1.0, 0.5), (2.0, 1.5)])
def test_p2(k, gamma):
    st = S.get("p2", k=k, gamma=gamma)
    snr = snr_np(LIN)
    a = abar_np(LIN)
    w_eps = 1.0 / (k + snr) ** gamma
    np.testing.assert_allclose(st.weights(LIN).numpy(), w_eps, rtol=1e-12)
    np.testing.assert_allclose(st.weights(LIN, "x0").numpy(), w_eps * snr, rtol=1e-12)
    np.testing.assert_allclose(st.weights(LIN, "v").numpy(), w_eps * a, rtol=1e-12)
    assert torch.allclose(st.probs(LIN), S.get("uniform").probs(LIN))


def test_p2_validation_and_zero_snr():
    with pytest.raises(ValueError, match="k"):
        S.get("p2", k=-1)
    with pytest.raises(ValueError, match="gamma"):
        S.get("p2", gamma=-0.5)
    w = S.get("p2").weights(ZSNR)
    assert torch.isfinite(w).all() and w[-1].item() == 1.0
    with pytest.raises(ValueError, match="SNR"):
        S.get("p2", k=0).weights(ZSNR)


def test_min_snr_forms():
    st = S.get("min-snr")
    snr = snr_np(LIN)
    np.testing.assert_allclose(st.weights(LIN, "eps").numpy(), np.minimum(snr, 5) / snr, rtol=1e-12)
    np.testing.assert_allclose(st.weights(LIN, "v").numpy(), np.minimum(snr, 5) / (snr + 1), rtol=1e-12)
    np.testing.assert_allclose(st.weights(LIN, "x0").numpy(), np.minimum(snr, 5), rtol=1e-12)
    # not the SpeeD repository's 5/(SNR+1) slip
    assert not np.allclose(st.weights(LIN).numpy(), 5 / (snr + 1))
    with pytest.raises(ValueError, match="gamma"):
        S.get("min-snr", gamma=0)


def test_min_snr_zero_terminal_guard():
    st = S.get("min-snr", gamma=5.0)
    for pred in ("eps", "v", "x0"):
        w = st.weights(ZSNR, pred)
        assert torch.isfinite(w).all()
    assert st.weights(ZSNR, "eps")[-1].item() == 1.0
    assert st.weights(ZSNR, "v")[-1].item() == 0.0
    assert st.weights(ZSNR, "x0")[-1].item() == 0.0


# ---------------------------------------------------------------------------- log-normal / logit-normal / clts
def test_lognormal_probs_independent():
    st = S.get("lognormal")
    a = abar_np(LIN)
    ls = 0.5 * np.log((1 - a) / a)
    edges = np.r_[-np.inf, (ls[1:] + ls[:-1]) / 2, np.inf]
    expect = norm.cdf(edges[1:], -1.2, 1.2) - norm.cdf(edges[:-1], -1.2, 1.2)
    np.testing.assert_allclose(st.probs(LIN).numpy(), expect / expect.sum(), rtol=1e-9, atol=1e-15)
    assert (st.weights(LIN) == 1).all()
    # mode near ln σ = -1.2 (σ ≈ 0.30)
    tmode = int(np.argmax(st.probs(LIN).numpy() / np.gradient(ls)))
    assert abs(ls[tmode] + 1.2) < 0.05
    # zero-terminal: the last step keeps a tail mass, all finite
    pz = st.probs(ZSNR)
    assert torch.isfinite(pz).all() and pz[-1] > 0


def test_lognormal_edm_weight():
    st = S.get("lognormal", edm_weight=True, sigma_data=0.5)
    a = abar_np(LIN)
    s2 = (1 - a) / a
    lam = (s2 + 0.25) / (s2 * 0.25)
    np.testing.assert_allclose(st.weights(LIN, "x0").numpy(), lam, rtol=1e-10)
    np.testing.assert_allclose(st.weights(LIN, "eps").numpy(), lam * s2, rtol=1e-10)
    np.testing.assert_allclose(st.weights(LIN, "v").numpy(), lam * s2 * a, rtol=1e-10)
    wz = st.weights(ZSNR, "v")
    assert torch.isfinite(wz).all() and wz[-1].item() == pytest.approx(4.0)
    assert st.weights(ZSNR, "x0")[-1].item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="SNR"):
        st.weights(ZSNR, "eps")
    with pytest.raises(ValueError, match="p_std"):
        S.get("lognormal", p_std=0)


def test_logit_normal_exact_mass():
    T = 100
    sched = NoiseSchedule.linear(T=T, beta_start=1e-3, beta_end=0.2)
    st = S.get("logit-normal", mean=0.3, std=0.8)
    expect = np.empty(T)
    for j in range(T):
        lo = -np.inf if j == 0 else math.log(j / T / (1 - j / T))
        hi = np.inf if j == T - 1 else math.log((j + 1) / T / (1 - (j + 1) / T))
        expect[j] = norm.cdf(hi, 0.3, 0.8) - norm.cdf(lo, 0.3, 0.8)
    np.testing.assert_allclose(st.probs(sched).numpy(), expect, rtol=1e-9, atol=1e-15)
    # Monte Carlo check of the same map t = floor(sigmoid(n) T)
    rng = np.random.default_rng(0)
    n = rng.normal(0.3, 0.8, 200000)
    t = np.clip(np.floor(1 / (1 + np.exp(-n)) * T), 0, T - 1).astype(int)
    emp = np.bincount(t, minlength=T) / n.size
    assert np.abs(emp - expect).max() < 0.003
    with pytest.raises(ValueError, match="std"):
        S.get("logit-normal", std=-1)


def test_clts_schedule_of_probs():
    st = S.get("clts")
    assert st.dynamic and st.params["ramp_steps"] == 50000
    u = np.full(1000, 1e-3)
    np.testing.assert_allclose(st.probs(LIN, step=0).numpy(), u, rtol=1e-12)
    t = np.arange(1000)
    g = np.exp(-0.5 * ((t - 300) / 150) ** 2)
    g /= g.sum()
    np.testing.assert_allclose(st.probs(LIN, step=25000).numpy(), 0.5 * g + 0.5 * u, rtol=1e-12)
    np.testing.assert_allclose(st.probs(LIN, step=50000).numpy(), g, rtol=1e-12)
    np.testing.assert_allclose(st.probs(LIN, step=200000).numpy(), g, rtol=1e-12)  # clipped, never negative
    assert int(np.argmax(st.probs(LIN, step=50000).numpy())) == 300
    st2 = S.get("clts", mu=100, sigma=20, ramp_steps=10)
    assert int(np.argmax(st2.probs(LIN, step=10).numpy())) == 100
    assert (st.weights(LIN) == 1).all()
    with pytest.raises(ValueError, match="sigma"):
        S.get("clts", sigma=0)


def test_clts_state_dict_round_trip():
    a = S.get("clts", mu=120.0, sigma=30.0, ramp_steps=1000)
    b = S.get("clts")
    b.load_state_dict(a.state_dict())
    assert b.params == a.params
    assert torch.equal(a.probs(LIN, step=500), b.probs(LIN, step=500))
    with pytest.raises(ValueError, match="strategy"):
        S.get("p2").load_state_dict(a.state_dict())


# ---------------------------------------------------------------------------- importance
def _feed(st, T, rounds, rng, loss_of_t):
    for _ in range(rounds):
        t = torch.from_numpy(rng.integers(0, T, size=64))
        losses = torch.from_numpy(loss_of_t(t.numpy())).float()
        st.update(t, losses)


def test_importance_warmup_then_nonuniform_and_unbiased():
    T = 20
    sched = NoiseSchedule.linear(T=T, beta_start=1e-3, beta_end=0.2)
    st = S.get("importance", history=5, uniform_prob=0.01)
    assert st.dynamic
    assert torch.allclose(st.probs(sched), torch.full((T,), 1 / T, dtype=torch.float64))
    assert (st.weights(sched) == 1).all()
    L = np.linspace(0.1, 2.0, T)
    rng = np.random.default_rng(0)
    st.update(torch.tensor([0, 1, 1]), torch.tensor([1.0, 1.0, 1.0]))
    assert torch.allclose(st.probs(sched), torch.full((T,), 1 / T, dtype=torch.float64))  # not yet full
    _feed(st, T, 30, rng, lambda t: L[t])
    p = st.probs(sched).numpy()
    w = st.weights(sched).numpy()
    assert not np.allclose(p, 1 / T)
    expect = L / L.sum() * 0.99 + 0.01 / T  # constant loss per t: sqrt(mean(L²)) = L
    np.testing.assert_allclose(p, expect, rtol=1e-6)
    np.testing.assert_allclose(w, 1 / (T * p), rtol=1e-12)
    # unbiased: Σ p w L = mean L
    assert float(np.sum(p * w * L)) == pytest.approx(L.mean(), rel=1e-12)


def test_importance_ring_buffer_matches_sequential_history():
    T, H = 4, 3
    st = S.get("importance", history=H, uniform_prob=0.0)
    sched = NoiseSchedule.linear(T=T, beta_start=0.01, beta_end=0.2)
    st.probs(sched)
    rng = np.random.default_rng(1)
    hist = {t: [] for t in range(T)}
    for _ in range(20):
        t = rng.integers(0, T, size=7)  # duplicates within a batch, often more than H of one t
        losses = rng.random(7) + 0.1
        st.update(torch.from_numpy(t), torch.from_numpy(losses))
        for ti, li in zip(t, losses):
            hist[int(ti)] = (hist[int(ti)] + [float(li)])[-H:]
    expect = np.array([math.sqrt(np.mean(np.square(hist[t]))) for t in range(T)])
    np.testing.assert_allclose(st.probs(sched).numpy(), expect / expect.sum(), rtol=1e-12)


def test_importance_state_dict_round_trip_and_errors():
    T = 10
    sched = NoiseSchedule.linear(T=T, beta_start=1e-3, beta_end=0.2)
    a = S.get("importance", history=3)
    a.probs(sched)
    rng = np.random.default_rng(2)
    _feed(a, T, 5, rng, lambda t: t + 1.0)
    b = S.get("importance", history=3)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.probs(sched), b.probs(sched)) and torch.equal(a.weights(sched), b.weights(sched))
    t = torch.tensor([1, 2]); losses = torch.tensor([5.0, 6.0])
    a.update(t, losses); b.update(t, losses)
    assert torch.equal(a.probs(sched), b.probs(sched))
    c = S.get("importance")  # different history: params restored from the state
    c.load_state_dict(a.state_dict())
    assert c.params["history"] == 3 and torch.equal(c.probs(sched), a.probs(sched))
    with pytest.raises(ValueError, match="same length"):
        a.update(torch.tensor([1, 2]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="t must"):
        a.update(torch.tensor([T]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="finite"):
        a.update(torch.tensor([1]), torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="T"):
        a.probs(NoiseSchedule.linear(T=T + 1))
    fresh = S.get("importance")
    with pytest.raises(ValueError):
        fresh.update(torch.tensor([1]), torch.tensor([1.0]))
    fresh.update(torch.tensor([1]), torch.tensor([1.0]), T=T)
    with pytest.raises(ValueError, match="history"):
        S.get("importance", history=0)
    with pytest.raises(ValueError, match="uniform_prob"):
        S.get("importance", uniform_prob=2)


# ---------------------------------------------------------------------------- combine
def test_combine():
    c = S.combine("speed", "p2")
    assert c.mirror and c.pivot(LIN) == 642
    assert torch.equal(c.probs(LIN), S.get("speed").probs(LIN))
    for pred in ("eps", "v", "x0"):
        assert torch.equal(c.weights(LIN, pred), S.get("p2").weights(LIN, pred))
    assert "speed" in c.name and "p2" in c.name
    c2 = S.get("speed+min-snr")
    assert torch.equal(c2.weights(LIN), S.get("min-snr").weights(LIN))
    imp = S.get("importance", history=1)
    c3 = S.combine(S.get("uniform"), imp)
    assert c3.dynamic and not c3.mirror
    T = 5
    sched = NoiseSchedule.linear(T=T, beta_start=0.01, beta_end=0.2)
    c3.weights(sched)
    c3.update(torch.arange(T), torch.arange(1, T + 1).double())
    assert not torch.allclose(c3.weights(sched), torch.ones(T, dtype=torch.float64))
    d = c3.state_dict()
    c4 = S.combine(S.get("uniform"), S.get("importance", history=1))
    c4.load_state_dict(d)
    assert torch.equal(c4.weights(sched), c3.weights(sched))
    with pytest.raises(ValueError):
        S.combine("speed", 3)
    with pytest.raises(ValueError, match="unknown"):
        S.combine("speed", "nope")
    with pytest.raises(ValueError):
        S.get("speed+p2", k=2)


def test_update_is_noop_for_static():
    st = S.get("speed")
    before = st.probs(LIN).clone()
    st.update(torch.tensor([1, 2]), torch.tensor([1.0, 2.0]))
    assert torch.equal(before, st.probs(LIN))
    d = st.state_dict()
    st2 = S.get("speed", k=2)
    st2.load_state_dict(d)
    assert st2.params == st.params and st2.mirror == st.mirror
