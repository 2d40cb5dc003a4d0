"""The learned strategies (`gradvar`, `uncertainty`): against plain references written here, on fresh
random inputs; tables written in place on the loss's device; exact state round trips."""
import math

import numpy as np
import pytest
import torch

from speed_kernels import DiffusionLoss
from speed_kernels import strategies as S
from speed_kernels.schedules import NoiseSchedule
from speed_kernels.tables import ROW_CDF, ROW_WEIGHT, sampling_row

LIN = NoiseSchedule.linear()


def gradvar_reference(pairs, T, buckets, ema_steps, mix, warmup):
    """The bucket table after feeding `pairs` [(t, loss) per step], written as plainly as possible."""
    edges = np.linspace(0, T, buckets + 1).round().astype(int)
    m, last, seen = [0.0] * buckets, [0] * buckets, [0] * buckets
    for step, (t, loss) in enumerate(pairs, start=1):
        for b in range(buckets):
            vals = [ell for tt, ell in zip(t, loss) if edges[b] <= tt < edges[b + 1] and math.isfinite(ell)]
            if not vals:
                continue
            mean = sum(vals) / len(vals)
            if seen[b] == 0:
                m[b] = mean
            else:
                m[b] += (1 - math.exp(-(step - last[b]) / ema_steps)) * (mean - m[b])
            last[b], seen[b] = step, seen[b] + 1
    if len(pairs) < warmup or min(seen) == 0:
        return np.full(buckets, 1.0 / buckets), edges
    root = np.sqrt(m)
    return (1 - mix) * root / root.sum() + mix / buckets, edges


def test_registered_and_bad_params():
    assert {"gradvar", "uncertainty"} <= set(S.names())
    for name, kw, word in (("gradvar", dict(buckets=0), "buckets"), ("gradvar", dict(ema_steps=0), "ema_steps"),
                           ("gradvar", dict(mix=2), "mix"), ("gradvar", dict(warmup_steps=-1), "warmup_steps"),
                           ("gradvar", dict(unbiased="no"), "unbiased"), ("gradvar", dict(unbiased=True, mix=0), "mix"),
                           ("uncertainty", dict(lr_scale=0), "lr_scale"), ("uncertainty", dict(buckets=1.5), "buckets")):
        with pytest.raises(ValueError, match=word):
            S.get(name, **kw)
    with pytest.raises(ValueError, match="before update"):
        S.get("gradvar").update(torch.tensor([1]), torch.tensor([1.0]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradvar_table_matches_the_plain_reference(seed):
    rng = np.random.default_rng(seed)
    kw = dict(buckets=int(rng.integers(3, 12)), ema_steps=float(rng.uniform(1, 20)), mix=float(rng.uniform(0, 0.9)),
              warmup_steps=int(rng.integers(0, 6)))
    st = S.get("gradvar", **kw)
    st.probs(LIN)  # builds the bucket map
    pairs = []
    for step in range(int(rng.integers(8, 30))):
        n = int(rng.integers(0, 40))
        t = rng.integers(0, LIN.T, n)
        loss = rng.gamma(2.0, 1.0 + t / 300.0)
        if n and step == 3:
            loss[0] = np.nan  # ignored, not learned from
        pairs.append((t.tolist(), loss.tolist()))
        st.update(torch.from_numpy(t), torch.from_numpy(loss))
    pb, edges = gradvar_reference(pairs, LIN.T, kw["buckets"], kw["ema_steps"], kw["mix"], kw["warmup_steps"])
    expect = np.repeat(pb / np.diff(edges), np.diff(edges))
    np.testing.assert_allclose(st.probs(LIN).numpy(), expect / expect.sum(), rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(st.bucket_edges(), edges)
    assert torch.equal(st.weights(LIN), torch.ones(LIN.T, dtype=torch.float64))


def test_gradvar_unbiased_weights_keep_the_uniform_objective():
    rng = np.random.default_rng(3)
    st = S.get("gradvar", unbiased=True, warmup_steps=1, buckets=10)
    st.probs(LIN)
    for _ in range(5):
        t = rng.integers(0, LIN.T, 256)
        st.update(torch.from_numpy(t), torch.from_numpy(rng.gamma(2.0, 1.0 + t / 100.0)))
    p, w = st.probs(LIN).numpy(), st.weights(LIN).numpy()
    assert not np.allclose(p, 1.0 / LIN.T)  # it learned a non-uniform table
    L = rng.gamma(1.0, 1.0, LIN.T)
    np.testing.assert_allclose((p * w * L).sum(), L.mean(), rtol=1e-9)  # Σ p_t w_t L_t = mean_t L_t


def test_gradvar_favours_the_buckets_with_the_larger_loss():
    st = S.get("gradvar", buckets=4, warmup_steps=0, mix=0.0)
    st.probs(LIN)
    t = torch.arange(0, 1000, 5)
    st.update(t, torch.where(t < 250, 4.0, 1.0).double())
    pb = st.bucket_probs().numpy()
    np.testing.assert_allclose(pb, np.array([2, 1, 1, 1]) / 5.0)  # ∝ √E[ℓ]: √4 = 2 against √1


def test_device_rows_are_written_in_place_and_match_the_host_tables():
    lf = DiffusionLoss(LIN, strategy="gradvar", strategy_params=dict(warmup_steps=2, buckets=8), backend="torch", seed=0)
    x0 = torch.randn(32, 2, 4, 4)
    tab = lf.tables("cpu")
    cdf_ptr, w_ptr = tab[ROW_CDF].data_ptr(), tab[ROW_WEIGHT].data_ptr()
    for _ in range(4):
        x_t, t = lf.noise(x0)
        pred = torch.randn_like(x0, requires_grad=True)
        lf.loss(pred, x0, t).backward()
    tab = lf.tables("cpu")
    assert tab[ROW_CDF].data_ptr() == cdf_ptr and tab[ROW_WEIGHT].data_ptr() == w_ptr
    assert not torch.allclose(lf.probs_table, torch.full((LIN.T,), 1.0 / LIN.T, dtype=torch.float64))
    lf.noise(x0)  # the table the next draw reads is the strategy's current one
    assert torch.equal(tab[ROW_CDF], sampling_row(lf.probs_table, LIN.T))


def test_gradvar_tables_agree_across_ranks_fed_the_same_pairs():
    rng = np.random.default_rng(5)
    a, b = (DiffusionLoss(LIN, strategy="gradvar", strategy_params=dict(warmup_steps=1), backend="torch", seed=0,
                          rank=r, auto_update=False) for r in (0, 1))
    for _ in range(6):
        t = torch.from_numpy(rng.integers(0, LIN.T, 128))
        loss = torch.from_numpy(rng.gamma(2.0, 1.0, 128))
        a.update_strategy(t, loss)
        b.update_strategy(t, loss)
    assert torch.equal(a.tables("cpu"), b.tables("cpu"))


def _uncertainty_loss(u_init, seed=0, learn_sigma=False, strategy="uncertainty"):
    lf = DiffusionLoss(LIN, strategy=strategy, backend="torch", seed=seed, learn_sigma=learn_sigma)
    (u,) = lf.parameters()
    with torch.no_grad():
        u.copy_(u_init)
    return lf, u


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_uncertainty_loss_value_and_gradients_match_edm2(learn_sigma):
    g = torch.Generator().manual_seed(11)
    u0 = torch.randn(20, generator=g)
    lf, u = _uncertainty_loss(u0, learn_sigma=learn_sigma)
    x0 = torch.randn(16, 2, 4, 4, generator=g)
    x_t, t = lf.noise(x0)
    out = torch.randn(16, 4 if learn_sigma else 2, 4, 4, generator=g, requires_grad=True)
    total = lf.loss(out, x0, t)
    total.backward()
    # the plain reference: EDM2's ℓ/e^u + u on the MSE term; the VB term (learned σ) as the plain loss has it
    plain = DiffusionLoss(LIN, strategy="uniform", backend="torch", seed=0, learn_sigma=learn_sigma)
    plain.noise(x0, t=t)
    out2 = out.detach().clone().requires_grad_(True)
    plain.loss(out2, x0, t).backward()
    mse, vb = plain.last_terms["mse"], plain.last_terms["vb"]
    u2 = u0.clone().requires_grad_(True)
    ub = u2[torch.from_numpy(np.searchsorted(np.linspace(0, 1000, 21).round(), t.numpy(), side="right") - 1)]
    ref = (mse * torch.exp(-ub) + ub + vb).mean()
    ref.backward()
    torch.testing.assert_close(total.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u.grad, u2.grad, rtol=1e-5, atol=1e-7)
    # ∂/∂pred: the prediction channels scaled by e^{-u} per sample; the variance channels (the VB term,
    # which sees the prediction detached, as DiT's hybrid loss) unscaled
    scale = torch.exp(-ub.detach()).view(-1, 1, 1, 1).expand_as(out2.grad).clone()
    scale[:, 2:] = 1.0
    torch.testing.assert_close(out.grad, out2.grad * scale, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("strategy", ["uncertainty", "speed+uncertainty"])
def test_a_learned_weighting_whose_parameters_reach_no_optimizer_warns_once(strategy, recwarn):
    x0 = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    forgot = DiffusionLoss(LIN, strategy=strategy, backend="torch", seed=0)
    for _ in range(3):
        _, t = forgot.noise(x0)
        forgot.loss(torch.zeros_like(x0), x0, t)
    said = [w for w in recwarn if "loss_fn.parameters(device) was never asked for" in str(w.message)]
    assert len(said) == 1 and issubclass(said[0].category, UserWarning)
    recwarn.clear()
    lf, _ = _uncertainty_loss(torch.zeros(20), strategy=strategy)  # asked for: no warning
    _, t = lf.noise(x0)
    lf.loss(torch.zeros_like(x0), x0, t)
    plain = DiffusionLoss(LIN, strategy="speed+p2", backend="torch", seed=0)  # nothing to learn: no warning
    _, t = plain.noise(x0)
    plain.loss(torch.zeros_like(x0), x0, t)
    assert not [w for w in recwarn if "never asked for" in str(w.message)]


def test_uncertainty_learns_the_log_loss_level_of_each_bucket():
    lf, u = _uncertainty_loss(torch.zeros(20))
    opt = torch.optim.Adam([u], lr=0.05)
    level = torch.linspace(0.01, 2.0, 20)  # the loss level of each bucket
    g = torch.Generator().manual_seed(2)
    st = lf.strategy
    for i in range(600):
        if i == 400:  # a smaller step to settle: Adam's noise at lr 0.05 is ~0.1 in u
            opt.param_groups[0]["lr"] = 0.005
        t = torch.randint(0, 1000, (256,), generator=g)
        b = st._buckets(t)
        ell = level[b] * -torch.log(torch.rand(256, generator=g))  # exponential, mean level[b]
        opt.zero_grad()
        st.extra_loss(t, ell * torch.exp(-u.detach()[b])).mean().backward()
        opt.step()
    torch.testing.assert_close(u.detach(), level.log(), atol=0.1, rtol=0)  # e^u -> E[ℓ_b]


def test_uncertainty_weight_row_is_exp_minus_u_and_state_round_trips_in_place():
    lf, u = _uncertainty_loss(torch.linspace(-3, 1, 20), strategy="speed+uncertainty")
    x0 = torch.randn(8, 2, 4, 4)
    lf.noise(x0)
    row = lf.tables("cpu")[ROW_WEIGHT]
    edges = np.linspace(0, 1000, 21).round().astype(int)
    expect = np.repeat(np.exp(-np.linspace(-3, 1, 20)), np.diff(edges))
    np.testing.assert_allclose(row.numpy(), expect, rtol=1e-6)
    state = lf.state_dict()
    other, u2 = _uncertainty_loss(torch.zeros(20), strategy="speed+uncertainty")
    other.load_state_dict(state)
    assert other.parameters()[0] is u2  # the optimizer's Parameter is the one loaded into
    assert torch.equal(u2.detach(), u.detach())
    assert torch.equal(other.tables("cpu")[ROW_WEIGHT], row)
    bad = dict(state)
    bad["strategy_state"] = {**state["strategy_state"], "weighting": {**state["strategy_state"]["weighting"],
                                                                      "u": torch.zeros(7)}}
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(bad)


def test_gradvar_state_round_trip_continues_identically():
    rng = np.random.default_rng(8)
    a = S.get("gradvar", warmup_steps=2)
    a.probs(LIN)
    for _ in range(5):
        t = rng.integers(0, LIN.T, 64)
        a.update(torch.from_numpy(t), torch.from_numpy(rng.gamma(2.0, 1.0, 64)))
    b = S.get("gradvar", warmup_steps=2)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        t = rng.integers(0, LIN.T, 64)
        loss = rng.gamma(2.0, 1.0, 64)
        a.update(torch.from_numpy(t), torch.from_numpy(loss))
        b.update(torch.from_numpy(t), torch.from_numpy(loss))
    assert torch.equal(a.probs(LIN), b.probs(LIN))
    with pytest.raises(ValueError, match="shape"):
        b.load_state_dict({**a.state_dict(), "m": torch.zeros(3)})


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["gradvar", "speed+uncertainty"])
def test_learned_strategies_never_sync_the_host_on_cuda(strategy):
    lf = DiffusionLoss(LIN, strategy=strategy, strategy_params=None, backend="triton", seed=0, check_inputs=False)
    params = lf.parameters("cuda")
    opt = torch.optim.Adam(params, lr=1e-2) if params else None
    x0 = torch.randn(64, 4, 8, 8, device="cuda")
    lf.loss(torch.zeros(64, 4, 8, 8, device="cuda"), x0, lf.noise(x0)[1])  # first step: allocations, compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            x_t, t = lf.noise(x0)
            pred = (x_t * 0.5).requires_grad_(True)
            lf.loss(pred, x0, t).backward()
            if opt:
                opt.step()
                opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert lf.tables("cuda").device.type == "cuda"
