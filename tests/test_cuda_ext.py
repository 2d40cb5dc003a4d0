"""The compiled `cuda` backend against the plain-PyTorch reference (and Triton, when importable).

GPU only (marked `gpu`; skipped without a CUDA device). Where a GPU exists, an extension built
without the CUDA kernels skips these tests, except under SPEED_KERNELS_REQUIRE_EXT=1 (fail).
"""
import os

import pytest
import torch

from speed_kernels.op_schema import DiffusionArgs

from speed_kernels import _ext, reference, rng
from speed_kernels import tables as tb
from speed_kernels.schedules import NoiseSchedule

pytestmark = pytest.mark.gpu
# SPEED_KERNELS_REQUIRE_ALL=1 (CI) requires every component, the extension included
REQUIRE = os.environ.get("SPEED_KERNELS_REQUIRE_EXT") == "1" or os.environ.get("SPEED_KERNELS_REQUIRE_ALL") == "1"
DEV = torch.device("cuda")
SCHED = NoiseSchedule.linear()
T = 1000
KEYS = rng.fold_key(0x1234_5678_9ABC_DEF0, 3)


@pytest.fixture(autouse=True)
def _need_cuda_extension():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    info = _ext.available()
    if not info["cuda"]:
        why = info["error"] or "speed_kernels._C was built without the CUDA kernels"
        if REQUIRE:
            pytest.fail(f"SPEED_KERNELS_REQUIRE_EXT=1 but: {why}")
        pytest.skip(why)


def _ops():
    return torch.ops.speed_kernels


def _cuda():
    return _ext.backend("cuda")


def make_tables(target=0, learn_sigma=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(T, generator=g, dtype=torch.float64) ** 3
    probs[100:130] = 0.0
    weights = torch.rand(T, generator=g, dtype=torch.float64) + 0.25
    return tb.build_tables(SCHED, probs, weights, tb.TARGETS[target], learn_sigma).to(DEV)


def assert_per_sample(ours, ref32, ref64, what, rel_floor=2e-5, abs_floor=2 * torch.finfo(torch.float32).eps):
    """Per sample (per t), the design's rule against float64: |ours - ref64| <= 2 |ref32 - ref64|
    + rel_floor |ref64| + abs_floor (float32's -1 + lv + exp(-lv) of O(1) terms rounds to ~eps in
    absolute terms, whatever the size of the KL). A max-normalised error would let the t = 0 NLL (~1.5 bits) set the scale
    and hide a 1 % error in a KL of 1e-3; per sample it cannot, and where float32 itself cancels
    (the tiny KL at t = T-1) the reference's own error widens the bound for that sample only."""
    ours, ref32, ref64 = ours.detach().double().cpu(), ref32.detach().double().cpu(), ref64.detach().double().cpu()
    err = (ours - ref64).abs()
    bound = 2 * (ref32 - ref64).abs() + rel_floor * ref64.abs() + abs_floor
    bad = (err > bound).nonzero().flatten().tolist()
    assert not bad, f"{what}: samples {bad} off by {err[bad].tolist()} (bound {bound[bad].tolist()})"


def per_sample_relerr(a, b):
    """Largest over samples of max |a_i - b_i| / max |b_i| (each sample on its own scale)."""
    a, b = a.detach().double().flatten(1).cpu(), b.detach().double().flatten(1).cpu()
    return ((a - b).abs().amax(1) / b.abs().amax(1).clamp(min=1e-30)).max().item()


def relerr(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.parametrize("batch", [1, 3, 64, 257, 4096])
def test_timesteps_bit_identical_with_reference_and_cpp(batch, mirror):
    tab = make_tables()
    k0, k1 = KEYS
    x0 = torch.zeros(batch, 1, 4, 4, device=DEV)
    for call0, pivot in [(0, 642), (2**32 + 3, 999), (77, 0)]:
        c_ref = torch.tensor([call0], device=DEV)
        c_cu = torch.tensor([call0], device=DEV)
        _, t_ref = reference.noise(x0, None, tab, k0, k1, c_ref, mirror, pivot)
        _, t_cu = _ops().noise(x0, None, tab, k0, k1, c_cu, mirror, pivot)
        assert torch.equal(t_cu, t_ref)
        assert c_cu.item() == call0 + 1
        if _ext.available()["cpu"]:
            _, t_cpu = _ops().noise(x0.cpu(), None, tab.cpu(), k0, k1, torch.tensor([call0]), mirror, pivot)
            assert torch.equal(t_cpu, t_ref.cpu())


SHAPES = [(5, 3, 7, 5), (64, 3, 64, 64), (256, 4, 32, 32), (3, 1, 1, 3), (2, 4, 9, 8)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_noise_matches_reference(shape, dtype):
    tab = make_tables()
    k0, k1 = KEYS
    x0 = (torch.rand(shape, device=DEV) * 2 - 1).to(dtype)
    for t_in in (None, torch.randint(0, T, (shape[0],), device=DEV)):
        c_ref, c_cu = torch.tensor([11], device=DEV), torch.tensor([11], device=DEV)
        x_ref, t_ref = reference.noise(x0, t_in, tab, k0, k1, c_ref, True, 642)
        x_cu, t_cu = _ops().noise(x0, t_in, tab, k0, k1, c_cu, True, 642)
        assert torch.equal(t_cu, t_ref)
        if dtype == torch.float32:
            torch.testing.assert_close(x_cu, x_ref, rtol=1e-5, atol=4e-6)
        else:
            torch.testing.assert_close(x_cu.float(), x_ref.float(), rtol=torch.finfo(dtype).eps, atol=1e-5)


def test_unaligned_and_odd_sizes_take_the_scalar_path():
    tab = make_tables()
    k0, k1 = KEYS
    buf = torch.rand(4 * 3 * 16 * 16 + 1, device=DEV)
    x0 = buf[1:].view(4, 3, 16, 16)  # 4-byte offset: not 16-byte aligned
    c_ref, c_cu = torch.tensor([3], device=DEV), torch.tensor([3], device=DEV)
    x_ref, t_ref = reference.noise(x0, None, tab, k0, k1, c_ref, False, 0)
    x_cu, t_cu = _ops().noise(x0, None, tab, k0, k1, c_cu, False, 0)
    assert torch.equal(t_cu, t_ref)
    torch.testing.assert_close(x_cu, x_ref, rtol=1e-5, atol=4e-6)


CASES = [(target, ls) for target in (0, 1, 2) for ls in (False, True)]


def _inputs(target, learn_sigma, dtype=torch.float32, shape=(16, 4, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    tab = make_tables(target, learn_sigma, seed=seed)
    k0, k1 = KEYS
    B = shape[0]
    x0 = torch.rand(shape, generator=g) * 2 - 1
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])
    x0 = x0.to(DEV)
    call = torch.tensor([5], device=DEV)
    _, t = reference.noise(x0, None, tab, k0, k1, call.clone(), True, 642)
    t[0], t[1], t[2] = 0, 1, T - 1
    eps = rng.normal_per_element(B, x0[0].numel(), torch.tensor(5, device=DEV), k0, k1).view(shape)
    ab = tab[tb.ROW_SQRT_AB][t].view(-1, *([1] * (len(shape) - 1))) ** 2
    tgt = {0: eps, 1: ab.sqrt() * eps - (1 - ab).sqrt() * x0, 2: x0}[target]
    out = tgt + 0.05 * torch.randn(shape, generator=g).to(DEV)
    if learn_sigma:
        out = torch.cat([out, (torch.rand(shape, generator=g) * 2 - 1).to(DEV)], 1)
    return out.to(dtype), x0.to(dtype), t, tab, k0, k1, torch.tensor([6], device=DEV)


@pytest.mark.parametrize("reduce_mean", [True, False])
@pytest.mark.parametrize("target,learn_sigma", CASES)
def test_loss_and_grad_match_reference(target, learn_sigma, reduce_mean):
    pred, x0, t, tab, k0, k1, call = _inputs(target, learn_sigma)
    p_ref, p_cu = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    l_ref, terms_ref = reference.loss(p_ref, x0, t, tab, k0, k1, call, target, learn_sigma, reduce_mean)
    l_cu, terms_cu = _cuda().loss(p_cu, x0, t, DiffusionArgs(tab, k0, k1, call, target, learn_sigma), reduce_mean)
    assert l_cu.shape == l_ref.shape
    assert relerr(l_cu, l_ref) < 2e-5
    assert relerr(terms_cu[0], terms_ref[0]) < 2e-5
    if learn_sigma:
        assert relerr(terms_cu[1], terms_ref[1]) < 2e-5
        p64 = pred.double().requires_grad_()
        l64, terms64 = reference.loss(p64, x0.double(), t, tab, k0, k1, call, target, True, reduce_mean)
        assert_per_sample(terms_cu[1], terms_ref[1], terms64[1], "VLB")
        assert_per_sample(terms_cu[0], terms_ref[0], terms64[0], "MSE")
        if not reduce_mean:
            assert_per_sample(l_cu, l_ref, l64, "per-sample loss")
    g = torch.rand(l_ref.shape, device=DEV) + 0.5
    (l_ref * g).sum().backward()
    (l_cu * g).sum().backward()
    if not learn_sigma:
        assert relerr(p_cu.grad, p_ref.grad) < 2e-5
    else:
        p64 = pred.double().requires_grad_()
        l64, _ = reference.loss(p64, x0.double(), t, tab, k0, k1, call, target, learn_sigma, reduce_mean)
        (l64 * g.double()).sum().backward()
        scale = p64.grad.abs().max().item()
        err_cu = (p_cu.grad.double() - p64.grad).abs().max().item() / scale
        err_ref = (p_ref.grad.double() - p64.grad).abs().max().item() / scale
        assert err_cu <= 2 * err_ref + 2e-6, (err_cu, err_ref)
        assert per_sample_relerr(p_cu.grad[t > 0], p_ref.grad[t > 0]) < 2e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("target,learn_sigma", CASES)
def test_low_precision(dtype, target, learn_sigma):
    pred, x0, t, tab, k0, k1, call = _inputs(target, learn_sigma, dtype=dtype, seed=1)
    p_ref, p_cu = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    l_ref, _ = reference.loss(p_ref, x0, t, tab, k0, k1, call, target, learn_sigma, True)
    l_cu, _ = _cuda().loss(p_cu, x0, t, DiffusionArgs(tab, k0, k1, call, target, learn_sigma), True)
    assert relerr(l_cu, l_ref) < 5e-5
    l_ref.backward()
    l_cu.backward()
    assert p_cu.grad.dtype == dtype
    p64 = pred.double().requires_grad_()
    l64, _ = reference.loss(p64, x0.double(), t, tab, k0, k1, call, target, learn_sigma, True)
    l64.backward()
    err_cu = (p_cu.grad.double() - p64.grad).abs().max().item()
    err_ref = (p_ref.grad.double() - p64.grad).abs().max().item()
    assert err_cu <= 2 * err_ref + torch.finfo(dtype).eps * p64.grad.abs().max().item()


def test_cuda_matches_cpp_backend():
    pred, x0, t, tab, k0, k1, call = _inputs(1, True, shape=(8, 3, 16, 16))
    l_cu, terms_cu = _cuda().loss(pred, x0, t, DiffusionArgs(tab, k0, k1, call, 1, True), False)
    l_cpu, terms_cpu = _ext.backend("cpp").loss(pred.cpu(), x0.cpu(), t.cpu(), DiffusionArgs(tab.cpu(), k0, k1, call.cpu(), 1, True), False)
    assert relerr(l_cu.cpu(), l_cpu) < 2e-5
    assert relerr(terms_cu.cpu(), terms_cpu) < 2e-5


def test_no_host_sync_and_deterministic():
    pred, x0, t, tab, k0, k1, call = _inputs(0, True, shape=(32, 4, 32, 32))
    ops = _ops()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x_t, tt = ops.noise(x0, None, tab, k0, k1, call, True, 642)
        a = ops.loss(pred, x0, tt, tab, k0, k1, call, 0, True, True, True)
        b = ops.loss(pred, x0, tt, tab, k0, k1, call, 0, True, True, True)
        g = ops.loss_backward(torch.ones(32, device=DEV), pred, x0, tt, tab, k0, k1, call, 0, True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert call.item() == 7
    assert g.shape == pred.shape


def test_out_of_range_t_gives_nan_not_a_crash():
    pred, x0, t, tab, k0, k1, call = _inputs(0, False)
    bad = t.clone()
    bad[3] = T + 5
    x_t, _ = _ops().noise(x0, bad, tab, k0, k1, call.clone(), False, 0)
    assert torch.isnan(x_t[3]).all() and torch.isfinite(x_t[4]).all()
    loss, terms, _ = _ops().loss(pred, x0, bad, tab, k0, k1, call, 0, False, False, False)
    assert torch.isnan(loss[3]) and torch.isfinite(loss[4])


def test_cuda_graph_capture_advances_the_counter():
    pred, x0, t, tab, k0, k1, _ = _inputs(0, False, shape=(8, 4, 16, 16))
    be = _cuda()
    call = torch.tensor([100], device=DEV)
    p = pred.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the graph
        be.noise(x0, None, DiffusionArgs(tab, k0, k1, call, mirror=False, pivot=0))
        be.loss(p, x0, t, DiffusionArgs(tab, k0, k1, call, 0, False), True)
    torch.cuda.current_stream().wait_stream(s)
    call.fill_(100)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_xt, g_t = be.noise(x0, None, DiffusionArgs(tab, k0, k1, call, mirror=False, pivot=0))
        g_loss, _ = be.loss(p, x0, g_t, DiffusionArgs(tab, k0, k1, call, 0, False), True)
    call.fill_(200)
    for step in range(2):
        graph.replay()
        ref_call = torch.tensor([200 + step], device=DEV)
        x_ref, t_ref = reference.noise(x0, None, tab, k0, k1, ref_call, False, 0)
        l_ref, _ = reference.loss(p, x0, t_ref, tab, k0, k1, ref_call, 0, False, True)
        assert torch.equal(g_t, t_ref)
        torch.testing.assert_close(g_xt, x_ref, rtol=1e-5, atol=4e-6)
        assert relerr(g_loss, l_ref) < 2e-5
    assert call.item() == 202


def test_torch_compile_traces_the_cuda_ops():
    pred, x0, t, tab, k0, k1, call = _inputs(2, False, shape=(4, 2, 8, 8))
    be = _cuda()

    def step(x0, pred, call):
        x_t, tt = be.noise(x0, None, DiffusionArgs(tab, k0, k1, call, mirror=False, pivot=0))
        loss, _ = be.loss(pred, x0, tt, DiffusionArgs(tab, k0, k1, call, 2, False), True)
        return loss, x_t

    c1, c2 = call.clone(), call.clone()
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    le, xe = step(x0, p1, c1)
    # aot_eager: traces through the fake kernels and functionalises the counter mutation without
    # Inductor's code generation (seconds, not a minute, in the GPU check's time budget)
    lc, xc = torch.compile(step, backend="aot_eager", fullgraph=True)(x0, p2, c2)
    assert torch.equal(c1, c2) and torch.equal(xe, xc)
    assert relerr(lc, le) < 1e-6
    le.backward()
    lc.backward()
    assert relerr(p2.grad, p1.grad) < 1e-6


def test_matches_triton_backend_when_available():
    from speed_kernels.backends import _LOAD_ERRORS, _try_load

    tri = _try_load("triton")
    if tri is None:
        from required import missing

        missing("the triton backend", _LOAD_ERRORS.get("triton"))
    pred, x0, t, tab, k0, k1, call = _inputs(0, True, shape=(16, 4, 16, 16))
    c_a, c_b = call.clone(), call.clone()
    x_tr, t_tr = tri.noise(x0, None, DiffusionArgs(tab, k0, k1, c_a, mirror=True, pivot=642))
    x_cu, t_cu = _cuda().noise(x0, None, DiffusionArgs(tab, k0, k1, c_b, mirror=True, pivot=642))
    assert torch.equal(t_cu, t_tr)
    torch.testing.assert_close(x_cu, x_tr, rtol=1e-5, atol=4e-6)
    l_tr, terms_tr = tri.loss(pred, x0, t_cu, DiffusionArgs(tab, k0, k1, c_a, 0, True), False)
    l_cu, terms_cu = _cuda().loss(pred, x0, t_cu, DiffusionArgs(tab, k0, k1, c_b, 0, True), False)
    assert relerr(l_cu, l_tr) < 5e-5
