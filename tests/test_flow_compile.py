"""torch.compile(fullgraph=True) over the flow ops (the torch.library registrations: fake kernels
and autograd) on the CPU backends, and opcheck of the compiled cpp ops."""
import pytest
import torch

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
