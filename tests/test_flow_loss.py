"""FlowMatchingLoss on every CPU backend (torch reference, cpp, Triton under the interpreter):
sigma's law (KS against each density's CDF), the same sigma bit for bit across backends, loss and
gradient against an independent float64 formula written here, state, ranks, SiT, errors."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from speed_kernels import flow_strategies as F
from speed_kernels import rng
from speed_kernels.flow import FlowMatchingLoss, flow_backends, sigma_from_sit, sit_time

CPU_BACKENDS = ["torch", "cpp", "triton"]
DENSITY_CASES = [
    ("uniform", {}), ("logit_normal", dict(mean=0.4, std=1.1)), ("mode", dict(scale=1.29)), ("cosmap", {}),
    ("laplace", dict(mu=0.0, b=0.5)), ("edm_lognormal", dict(p_mean=-0.4, p_std=1.0)), ("beta", dict(a=0.8, b=1.0)),
    ("speed", dict(k=5.0)),
]


def _need(backend):
    status = flow_backends()[backend]
    if status != "available":  # reported as skipped, never as passed
        pytest.skip(f"flow backend {backend}: {status}")


# ----------------------------------------------------------------------------- sigma's law
# Triton is not in the KS test: under the CPU interpreter one program (one sample) takes ~0.2 s
# here, so 20,000 draws would take an hour. Its sigma equals the reference's bit for bit (below),
# which carries the reference's KS result over.
@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("name,params", DENSITY_CASES)
@pytest.mark.parametrize("shift,clamp", [(1.0, None), (3.0, (0.05, 0.98))])
def test_sigma_follows_the_density(backend, name, params, shift, clamp):
    _need(backend)
    batch = 20000
    lf = FlowMatchingLoss(name, shift=shift, clamp=clamp, backend=backend, seed=11, strategy_params=params)
    _, sigma = lf.noise(torch.zeros(batch, 1))
    assert sigma.dtype == torch.float32 and sigma.shape == (batch,)
    s = sigma.double().numpy()
    lo, hi = (0.0, 1.0) if clamp is None else clamp
    assert s.min() >= lo and s.max() <= hi
    assert stats.kstest(s, lf.strategy.cdf).pvalue > 1e-3


SMALL = {"triton": 6}  # interpreted Triton: one program per sample, ~0.2 s each


@pytest.mark.parametrize("name,params", DENSITY_CASES)
def test_same_sigma_bit_for_bit_across_backends(name, params):
    runs = {}
    for backend in CPU_BACKENDS:
        if flow_backends()[backend] != "available":
            continue
        lf = FlowMatchingLoss(name, shift=2.0, backend=backend, seed=2**40 + 3, rank=1, strategy_params=params)
        x0 = torch.randn(48, 3, 2, generator=torch.Generator().manual_seed(0))[: SMALL.get(backend, 48)]
        draws = [lf.noise(x0) for _ in range(2)]  # two calls: the counter moves
        runs[backend] = draws
    assert "torch" in runs and len(runs) >= 2, f"only {list(runs)} available"
    ref = runs["torch"]
    for backend, draws in runs.items():
        for (xt, s), (xt_ref, s_ref) in zip(draws, ref):
            b = s.shape[0]
            assert torch.equal(s, s_ref[:b]), backend  # exact, not close
            xt_ref = xt_ref[:b]
            torch.testing.assert_close(xt, xt_ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ref[0][1], ref[1][1])


# ----------------------------------------------------------------------------- loss and gradient
def _weight64(name, sigma, prediction, gamma=5.0, k=1.0, p2_gamma=1.0):
    """Closed forms, independent of flow_strategies (float64)."""
    s = sigma
    snr = ((1 - s) / s) ** 2
    if name == "none":
        return torch.ones_like(s)
    if name == "sigma_sqrt":
        return s ** -2
    if name == "cosmap":
        return 2 / (math.pi * (1 - 2 * s + 2 * s * s))
    if name == "min_snr":
        x0_w = torch.minimum(snr, torch.full_like(s, gamma))  # on the x0 error
        return {"x0": x0_w, "v": x0_w * s * s, "eps": x0_w / snr}[prediction]
    if name == "p2":
        eps_w = (k + snr) ** -p2_gamma
        return {"eps": eps_w, "v": eps_w * (1 - s) ** 2, "x0": eps_w * snr}[prediction]
    raise AssertionError(name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("prediction", ["v", "x0", "eps"])
@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap", "min_snr", "p2"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_loss_and_grad_against_independent_formula(backend, prediction, weighting, reduction):
    _need(backend)
    gen = torch.Generator().manual_seed(5)
    B = 3 if backend == "triton" else 7  # interpreted Triton is slow
    x0 = torch.randn(B, 3, 5, 3, generator=gen)  # 45 elements per sample: a ragged last group
    lf = FlowMatchingLoss(f"logit_normal+{weighting}", backend=backend, prediction=prediction, seed=99,
                          clamp=(0.05, 0.95))
    lf.noise(x0)  # call 0
    x_t, sigma = lf.noise(x0)  # call 1: the loss must use this call's eps
    eps = rng.normal_per_element(B, 45, torch.tensor(1), lf.k0, lf.k1).view(x0.shape).double()
    s = sigma.double().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t.double(), (1 - s) * x0.double() + s * eps, rtol=1e-5, atol=1e-5)
    pred = torch.randn(x0.shape, generator=gen, requires_grad=True)
    out = lf.loss(pred, x0, sigma, reduction=reduction)
    g = torch.linspace(0.5, 2.0, B)
    (out * (g.mean() if reduction == "mean" else g)).sum().backward()

    p64 = pred.detach().double().requires_grad_(True)
    target = {"v": eps - x0.double(), "x0": x0.double(), "eps": eps}[prediction]
    per = ((p64 - target) ** 2).mean(dim=(1, 2, 3)) * _weight64(weighting, sigma.double(), prediction)
    ref = per.mean() if reduction == "mean" else per
    (ref * (g.double().mean() if reduction == "mean" else g.double())).sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(pred.grad.double(), p64.grad, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(lf.last_terms.double(), per.detach(), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_speed_for_flow_loss_uses_the_caw_weight(backend):
    _need(backend)
    B = 4 if backend == "triton" else 16
    x0 = torch.randn(B, 4, generator=torch.Generator().manual_seed(1))
    lf = FlowMatchingLoss("speed", backend=backend, seed=3)
    _, sigma = lf.noise(x0)
    pred = torch.zeros_like(x0)
    per = lf.loss(pred, x0, sigma, reduction="none")
    eps = rng.normal_per_element(B, 4, torch.tensor(0), lf.k0, lf.k1).double()
    mse = ((eps - x0.double()) ** 2).mean(1)
    s = sigma.double()
    d = 1.0
    g = d * d * (1 - s) / ((1 - s) ** 2 * d * d + s * s) ** 1.5
    grid = torch.linspace(0, 1, 100001, dtype=torch.float64)
    gmax = (d * d * (1 - grid) / ((1 - grid) ** 2 * d * d + grid * grid) ** 1.5).max()
    tau = lf.strategy.weighting.tau
    w = torch.where(s < tau, 0.4 + 0.2 * g / gmax, torch.ones_like(s))
    torch.testing.assert_close(per.double(), mse * w, rtol=2e-5, atol=1e-6)


# ----------------------------------------------------------------------------- state, ranks, SiT
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_state_dict_continues_the_stream(backend):
    _need(backend)
    x0 = torch.randn(9, 5)
    a = FlowMatchingLoss("mode", backend=backend, seed=17, rank=2)
    a.noise(x0)
    a.noise(x0)
    state = a.state_dict()
    want = a.noise(x0)
    b = FlowMatchingLoss("mode", backend=backend, seed=0)
    b.load_state_dict(state)
    got = b.noise(x0)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    with pytest.raises(ValueError, match="strategy"):
        FlowMatchingLoss("uniform").load_state_dict(state)


def test_ranks_get_their_own_streams():
    x0 = torch.zeros(64, 1)
    s0 = FlowMatchingLoss(backend="torch", seed=5, rank=0).noise(x0)[1]
    s1 = FlowMatchingLoss(backend="torch", seed=5, rank=1).noise(x0)[1]
    assert not torch.equal(s0, s1)
    k0, k1 = rng.fold_key(5, 0)
    u = rng.bits_to_uniform(rng.philox4x32(0, torch.arange(64), torch.tensor(0), 2, k0, k1)[0])
    torch.testing.assert_close(s0, u, rtol=0, atol=1.0 / 4096)  # uniform: sigma is u up to the table


def test_sit_converter_matches_sits_formula():
    x1 = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(2))
    lf = FlowMatchingLoss("logit_normal", backend="torch", seed=4)
    seen = {}

    def model(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return torch.tanh(x_t) * t.view(-1, 1, 1)

    losses = lf.sit_training_losses(model, x1)["loss"]
    noise = rng.normal_per_element(6, 6, torch.tensor(0), lf.k0, lf.k1).view(x1.shape)
    t = seen["t"].view(-1, 1, 1)
    torch.testing.assert_close(seen["x_t"], t * x1 + (1 - t) * noise, rtol=1e-5, atol=1e-6)  # SiT's path
    target = x1 - noise  # SiT's velocity: data - noise
    torch.testing.assert_close(losses, ((model(seen["x_t"], seen["t"]) - target) ** 2).mean(dim=(1, 2)))
    assert torch.equal(sigma_from_sit(sit_time(seen["t"])), seen["t"])


# ----------------------------------------------------------------------------- errors
def test_bad_input_errors():
    lf = FlowMatchingLoss(backend="torch")
    with pytest.raises(TypeError, match="x0"):
        lf.noise(torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="x0"):
        lf.noise(torch.zeros(3))
    with pytest.raises(ValueError, match="sigma"):
        lf.noise(torch.zeros(3, 2), sigma=torch.tensor([0.1, 1.5, 0.2]))
    with pytest.raises(RuntimeError, match="noise"):
        FlowMatchingLoss(backend="torch").loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2))
    lf.noise(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="pred"):
        lf.loss(torch.zeros(3, 3), torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="reduction"):
        lf.loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3), reduction="sum")
    with pytest.raises(ValueError, match="prediction"):
        FlowMatchingLoss(prediction="score")
    with pytest.raises(ValueError, match="backend"):
        FlowMatchingLoss(backend="cuda-graphs")
    with pytest.raises(TypeError, match="strategy"):
        FlowMatchingLoss(strategy=3)


def test_shift_as_a_strategy_parameter():
    a = FlowMatchingLoss("mode", shift=3.0, backend="torch")
    b = FlowMatchingLoss("mode", backend="torch", strategy_params={"shift": 3.0})
    assert a.shift == b.shift == 3.0
    assert torch.equal(a.tables("cpu"), b.tables("cpu"))
