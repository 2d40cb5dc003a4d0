"""torch.compile(fullgraph=True) over the flow ops (the torch.library registrations: fake kernels
and autograd) on the CPU backends, and opcheck of the compiled cpp ops."""
import pytest
import torch

from speed_kernels import rng
from speed_kernels.flow import FlowMatchingLoss, flow_backends, select_flow_backend


def _need(backend):
    status = flow_backends()[backend]
    if status != "available":
        pytest.skip(f"flow backend {backend}: {status}")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_step_matches_eager(backend, reduction):
    _need(backend)
    x0 = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
    lin = torch.nn.Linear(4, 4)

    def make():
        return FlowMatchingLoss("logit_normal+min_snr", shift=3.0, backend=backend, seed=21)

    def step(lf, x0):
        x_t, sigma = lf.noise(x0)
        out = lf.loss(lin(x_t), x0, sigma, reduction=reduction)
        return (out if reduction == "mean" else out.sum()), sigma, x_t

    eager_lf, comp_lf = make(), make()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for _ in range(2):  # the counter moves: fresh sigma on the second call
        lin.zero_grad()
        le, se, xe = step(eager_lf, x0)
        le.backward()
        ge = lin.weight.grad.clone()
        lin.zero_grad()
        lc, sc, xc = compiled(comp_lf, x0)
        lc.backward()
        assert torch.equal(sc, se)
        torch.testing.assert_close(xc, xe)
        torch.testing.assert_close(lc, le)
        torch.testing.assert_close(lin.weight.grad, ge)
    assert eager_lf.state_dict()["call"] == comp_lf.state_dict()["call"] == 2


def test_opcheck_cpp_flow_ops():
    _need("cpp")
    lf = FlowMatchingLoss("beta", backend="cpp", seed=4)
    tab = lf.tables("cpu")
    x0 = torch.randn(3, 5)
    call = torch.tensor([2])
    ops = torch.ops.speed_kernels
    torch.library.opcheck(ops.flow_noise.default, (x0, None, tab, lf.k0, lf.k1, call.clone()))
    torch.library.opcheck(ops.flow_noise.default, (x0, torch.rand(3), tab, lf.k0, lf.k1, call.clone()))
    pred = torch.randn(3, 5, requires_grad=True)
    for target in (0, 1, 2):
        torch.library.opcheck(ops.flow_loss.default,
                              (pred, x0, torch.rand(3), tab, lf.k0, lf.k1, call, target, False, True))


def test_cpp_ops_reject_bad_input():
    _need("cpp")
    lf = FlowMatchingLoss(backend="cpp")
    tab = lf.tables("cpu")
    ops = torch.ops.speed_kernels
    with pytest.raises(ValueError, match="flow tables"):
        ops.flow_noise(torch.zeros(2, 3), None, tab[:2], 0, 0, torch.zeros(1, dtype=torch.long))
    with pytest.raises(TypeError, match="x0"):
        ops.flow_noise(torch.zeros(2, 3, dtype=torch.float64), None, tab, 0, 0, torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="sigma"):
        ops.flow_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), tab, 0, 0,
                      torch.zeros(1, dtype=torch.long), 1, False, False)
    with pytest.raises(ValueError, match="target"):
        ops.flow_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), tab, 0, 0,
                      torch.zeros(1, dtype=torch.long), 5, False, False)


def test_backend_selection():
    assert select_flow_backend("torch", "cpu").name == "torch"
    with pytest.raises(ValueError, match="backend"):
        select_flow_backend("cuda", "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_flow_eps_cache_and_isa_change_no_bit(monkeypatch, dtype):
    """The flow ops share the DDPM ops' vectorised eps and eps cache (csrc/cpu_eps.h): a loss that
    reads the noise op's cached eps and one that regenerates it (cache off) give the same bits, a
    loss for another call does not reuse the cache, the portable and AVX2 loops agree to rounding;
    an odd element count exercises the chunk tail."""
    _need("cpp")
    lf = FlowMatchingLoss("logit_normal", backend="cpp", seed=9)
    tab = lf.tables("cpu")
    ops = torch.ops.speed_kernels
    x0 = torch.randn(5, 3, 7, 9).to(dtype)
    pred = torch.randn(5, 3, 7, 9).to(dtype)
    outs = {}
    for isa in ("native", "generic"):
        for cache in ("1", "0"):
            monkeypatch.setenv("SPEED_KERNELS_CPU_EPS_CACHE", cache)
            if isa == "generic":
                monkeypatch.setenv("SPEED_KERNELS_CPU_ISA", "generic")
            else:
                monkeypatch.delenv("SPEED_KERNELS_CPU_ISA", raising=False)
            call = torch.tensor([11])
            x_t, sigma = ops.flow_noise(x0, None, tab, lf.k0, lf.k1, call)
            got = [x_t, sigma]
            for target in (0, 1, 2):
                got += list(ops.flow_loss(pred, x0, sigma, tab, lf.k0, lf.k1, call - 1, target, False, True))
            other = ops.flow_loss(pred, x0, sigma, tab, lf.k0, lf.k1, call, 1, False, True)[0]  # a cache miss
            outs[(isa, cache)] = (got, other)
    ref_got, ref_other = outs[("native", "1")]
    for isa in ("native", "generic"):  # within one ISA the cache changes no bit
        (a_got, a_other), (b_got, b_other) = outs[(isa, "1")], outs[(isa, "0")]
        assert all(torch.equal(a, b) for a, b in zip(a_got, b_got)) and torch.equal(a_other, b_other), isa
    for a, b in zip(outs[("generic", "1")][0], ref_got):  # across ISAs: float rounding (FMA contraction)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)
    assert not torch.equal(ref_other, ref_got[4])  # call + 1 scored another eps
    # and the values are the formula's (weighting none: w = 1): per[b] = mean((pred - (eps - x0))^2)
    eps = rng.normal_per_element(5, 3 * 7 * 9, torch.tensor([11]), lf.k0, lf.k1).view(x0.shape)
    expect = (pred.float() - (eps - x0.float())).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(ref_got[4], expect, rtol=1e-5, atol=1e-6)
