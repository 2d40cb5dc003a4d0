"""GPU tests of the Triton backend: bf16 and large shapes against the reference,
torch.compile(fullgraph=True), CUDA-graph capture + replay with fresh randomness, independent
seeds, batches over 2^31 elements.

Marked `gpu` (skipped without CUDA). `SPEED_GPU_SMOKE=1` runs them on the CPU through the Triton
interpreter with tiny shapes instead (catches Python errors without a GPU; CUDA-graph and
2^31-element tests are skipped there).
"""
import math
import os

import pytest
import torch

from speed_kernels.op_schema import DiffusionArgs

from speed_kernels import reference, rng
from speed_kernels.schedules import NoiseSchedule
from speed_kernels.tables import ROW_SQRT_1MAB, ROW_SQRT_AB, ROW_WEIGHT, TARGETS, build_tables

SMOKE = os.environ.get("SPEED_GPU_SMOKE") == "1" and not torch.cuda.is_available()
if not SMOKE:
    pytestmark = pytest.mark.gpu

from required import require_module  # noqa: E402  (skip, or fail under SPEED_KERNELS_REQUIRE_ALL=1)

triton = require_module("triton")
tb_mod = require_module("speed_kernels.ops.triton_backend")

DEV = "cpu" if SMOKE else "cuda"
T = 1000
PIVOT = 642
BACKEND = tb_mod.TritonBackend()
KEY = rng.fold_key(20240601)
needs_cuda = pytest.mark.skipif(SMOKE, reason="needs CUDA (smoke run on the CPU)")

# (batch, C, H, W): DiT latents, a pixel-space batch, and a large image (several chunks per sample)
SHAPES = [(4, 2, 4, 4)] if SMOKE else [(64, 4, 32, 32), (16, 3, 64, 64), (4, 3, 256, 256)]


def make_tables(prediction="eps", learn_sigma=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(T, generator=g, dtype=torch.float64) ** 3
    weights = torch.rand(T, generator=g, dtype=torch.float64) + 0.25
    return build_tables(NoiseSchedule.linear(T), probs, weights, prediction, learn_sigma).to(DEV)


def counter(v=0):
    return torch.tensor([v], dtype=torch.int64, device=DEV)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_rule(ours, ref_lo, ref64, floor):
    if ours.dtype in (torch.float16, torch.bfloat16):
        floor = max(floor, torch.finfo(ours.dtype).eps * ref64.abs().max().item())
    e, e_ref = max_err(ours, ref64), max_err(ref_lo, ref64)
    assert e <= 2 * e_ref + floor, f"error {e:.3g} vs reference's own {e_ref:.3g} (+{floor:.1g})"


def _backend_loss(pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean):
    """BACKEND.loss with the reference's positional signature (the two are compared side by side)."""
    return BACKEND.loss(pred, x0, t, DiffusionArgs(tables, k0, k1, call, target, learn_sigma), reduce_mean)


def _grad(fn, pred, *args, go=None):
    p = pred.detach().clone().requires_grad_()
    loss, terms = fn(p, *args)
    (g,) = torch.autograd.grad(loss, p, go if go is not None else torch.ones_like(loss))
    return loss.detach(), terms, g


_F32, _BF16, _F16 = torch.float32, torch.bfloat16, torch.float16
# A covering set rather than the full product: every kernel variant compiles once per dtype
# (seconds each on a fresh machine) and the whole GPU check has to fit in a few minutes.
CASES = (
    [(SHAPES[0], d, c) for d in (_F32, _BF16, _F16) for c in ("eps", "learned-sigma")]
    if SMOKE
    else [(SHAPES[0], _F32, c) for c in ("eps", "v", "x0", "learned-sigma")]
    + [(SHAPES[0], _BF16, "eps"), (SHAPES[0], _BF16, "learned-sigma"), (SHAPES[0], _F16, "v"),
       (SHAPES[1], _BF16, "eps"), (SHAPES[2], _F32, "eps"), (SHAPES[2], _F32, "learned-sigma"),
       (SHAPES[2], _BF16, "x0")]
)


@pytest.mark.parametrize(
    "shape,dtype,case", CASES, ids=["x".join(map(str, s)) + "-" + str(d).split(".")[-1] + "-" + c for s, d, c in CASES]
)
def test_gpu_noise_and_loss_match_reference(shape, dtype, case):
    learn_sigma = case == "learned-sigma"
    target = 0 if learn_sigma else TARGETS.index(case)
    tables = make_tables(TARGETS[target], learn_sigma)
    k0, k1 = KEY
    torch.manual_seed(0)
    x0 = torch.randn(shape, device=DEV).clamp(-1.1, 1.1).to(dtype)
    c1, c2 = counter(41), counter(41)
    xt, t = BACKEND.noise(x0, None, DiffusionArgs(tables, k0, k1, c1, mirror=True, pivot=PIVOT))
    xr, tr = reference.noise(x0, None, tables, k0, k1, c2, True, PIVOT)
    assert torch.equal(t, tr) and c1.item() == c2.item() == 42
    if dtype == torch.float32:
        torch.testing.assert_close(xt, xr, rtol=1e-5, atol=1e-5)
    else:
        x64, _ = reference.noise(x0.double(), tr, tables, k0, k1, counter(41), False, 0)
        assert_rule(xt, xr, x64, floor=1e-6)
    if learn_sigma:
        t[0] = 0  # exercise the NLL branch
    B, C = shape[0], shape[1]
    pred = torch.randn(B, 2 * C if learn_sigma else C, *shape[2:], device=DEV).to(dtype)
    args = (x0, t, tables, k0, k1, c1, target, learn_sigma, True)
    lo, to, go = _grad(_backend_loss, pred, *args)
    lr, tr_, gr = _grad(reference.loss, pred, *args)
    l64, t64, g64 = _grad(reference.loss, pred.double(), x0.double(), *args[1:])
    if dtype == torch.float32 and not learn_sigma:
        torch.testing.assert_close(lo, lr, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(go, gr, rtol=2e-5, atol=1e-8)
    assert_rule(lo, lr, l64, floor=1e-5 * abs(l64.item()))
    assert_rule(to, tr_, t64, floor=1e-5 * t64.abs().max().item())
    assert_rule(go, gr, g64, floor=1e-7 * g64.abs().max().item())
    # reduction none with a non-uniform grad_output: the backward kernel
    g_out = torch.linspace(-1, 2, B, device=DEV)
    args_n = args[:-1] + (False,)
    ln, _, gn = _grad(_backend_loss, pred, *args_n, go=g_out)
    lrn, _, grn = _grad(reference.loss, pred, *args_n, go=g_out)
    l64n, _, g64n = _grad(reference.loss, pred.double(), x0.double(), *args_n[1:], go=g_out.double())
    assert_rule(ln, lrn, l64n, floor=1e-5 * l64n.abs().max().item())
    assert_rule(gn, grn, g64n, floor=1e-7 * g64n.abs().max().item())


def test_gpu_loss_is_deterministic():
    tables = make_tables("eps", True)
    k0, k1 = KEY
    shape = SHAPES[-1]
    x0 = torch.randn(shape, device=DEV)
    call = counter(1)
    _, t = BACKEND.noise(x0, None, DiffusionArgs(tables, k0, k1, call, mirror=False, pivot=0))
    pred = torch.randn(shape[0], 2 * shape[1], *shape[2:], device=DEV)
    a = _grad(_backend_loss, pred, x0, t, tables, k0, k1, call, 0, True, True)
    b = _grad(_backend_loss, pred, x0, t, tables, k0, k1, call, 0, True, True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_gpu_two_seeds_are_independent():
    tables = make_tables()
    n = 64 * 4096 if not SMOKE else 8 * 64
    x0 = torch.zeros(64 if not SMOKE else 8, n // (64 if not SMOKE else 8), device=DEV)
    t_in = torch.full((x0.shape[0],), T - 1, dtype=torch.int64, device=DEV)
    xs = []
    for seed in (1, 2):
        k0, k1 = rng.fold_key(seed)
        xt, _ = BACKEND.noise(x0, t_in, DiffusionArgs(tables, k0, k1, counter(), mirror=False, pivot=0))
        xs.append((xt / tables[ROW_SQRT_1MAB][T - 1]).flatten().double())
    a, b = xs
    tol = 6 / math.sqrt(a.numel())
    assert abs(a.mean().item()) < tol and abs(a.std().item() - 1) < 3 * tol
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < tol
    # t streams: two seeds draw different time steps
    x1 = torch.zeros(256, 1, device=DEV)
    t1 = BACKEND.noise(x1, None, tables, *rng.fold_key(1), counter(), False, 0)[1]
    t2 = BACKEND.noise(x1, None, tables, *rng.fold_key(2), counter(), False, 0)[1]
    assert (t1 != t2).float().mean().item() > 0.9


def test_gpu_compile_fullgraph_matches_eager():
    tables = make_tables("v", True)
    k0, k1 = KEY
    shape = SHAPES[0]
    B, C = shape[0], shape[1]
    conv = torch.nn.Conv2d(C, 2 * C, 1).to(DEV)

    def step(x0, call):
        x_t, t = BACKEND.noise(x0, None, DiffusionArgs(tables, k0, k1, call, mirror=True, pivot=PIVOT))
        pred = conv(x_t)
        loss, terms = BACKEND.loss(pred, x0, t, DiffusionArgs(tables, k0, k1, call, 1, True), True)
        return loss, t, x_t

    compiled = torch.compile(step, fullgraph=True)
    x0 = torch.randn(shape, device=DEV)
    ca, cb = counter(7), counter(7)
    for _ in range(2):
        conv.zero_grad()
        la, ta, xa = compiled(x0, ca)
        la.backward()
        ga = conv.weight.grad.clone()
        conv.zero_grad()
        lb, tb, xb = step(x0, cb)
        lb.backward()
        gb = conv.weight.grad.clone()
        assert ca.item() == cb.item()
        assert torch.equal(ta, tb)
        torch.testing.assert_close(xa, xb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)


@needs_cuda
def test_gpu_cuda_graph_replay_fresh_randomness():
    tables = make_tables("eps", True)
    k0, k1 = KEY
    shape = SHAPES[1]
    B, C = shape[0], shape[1]
    x0 = torch.randn(shape, device=DEV)
    pred = torch.randn(B, 2 * C, *shape[2:], device=DEV, requires_grad=True)
    call = counter(100)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (Triton compiles) outside the capture
        for _ in range(2):
            pred.grad = None
            x_t, t = BACKEND.noise(x0, None, DiffusionArgs(tables, k0, k1, call, mirror=False, pivot=0))
            loss, _ = BACKEND.loss(pred, x0, t, DiffusionArgs(tables, k0, k1, call, 0, True), True)
            loss.backward()
    torch.cuda.current_stream().wait_stream(s)
    pred.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        x_t, t = BACKEND.noise(x0, None, DiffusionArgs(tables, k0, k1, call, mirror=False, pivot=0))
        loss, _ = BACKEND.loss(pred, x0, t, DiffusionArgs(tables, k0, k1, call, 0, True), True)
        loss.backward()
    start = call.item()  # capture does not run the kernels
    seen = []
    for i in range(3):
        g.replay()
        torch.cuda.synchronize()
        assert call.item() == start + i + 1
        c_ref = counter(start + i)
        xr, tr = reference.noise(x0, None, tables, k0, k1, c_ref, False, 0)
        assert torch.equal(t, tr)
        torch.testing.assert_close(x_t, xr, rtol=1e-5, atol=1e-5)
        lr, gr = _grad(reference.loss, pred, x0, tr, tables, k0, k1, c_ref, 0, True, True)[0::2]
        torch.testing.assert_close(loss, lr, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(pred.grad, gr, rtol=1e-4, atol=1e-8)
        seen.append(t.clone())
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])


@needs_cuda
def test_gpu_diffusion_loss_in_cuda_graph():
    from speed_kernels.loss import DiffusionLoss

    fn = DiffusionLoss(NoiseSchedule.linear(T), strategy="speed", learn_sigma=True, backend="triton",
                       seed=5, check_inputs=False)
    B, C = 32, 4
    x0 = torch.randn(B, C, 16, 16, device=DEV)
    conv = torch.nn.Conv2d(C, 2 * C, 3, padding=1).to(DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            conv.zero_grad(set_to_none=True)
            fn(lambda x, t: conv(x), x0).backward()
    torch.cuda.current_stream().wait_stream(s)
    conv.zero_grad(set_to_none=True)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        x_t, t = fn.noise(x0)
        loss = fn.loss(conv(x_t), x0, t)
        loss.backward()
    ts = []
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        assert math.isfinite(loss.item())
        ts.append(t.clone())
    assert not torch.equal(ts[0], ts[1])


@needs_cuda
def test_gpu_over_2_31_elements():
    """Two samples of 2^30 + 2^20 fp16 elements: sample 1's offsets pass 2^31."""
    free, _ = torch.cuda.mem_get_info()
    n = 2**30 + 2**20
    B = 2
    if free < (2 + 2 + 4 + 4) * B * n + (2 << 30):
        pytest.skip("not enough GPU memory")
    tables = make_tables()
    k0, k1 = KEY
    x0 = torch.full((B, n), 0.5, dtype=torch.float16, device=DEV)
    t_in = torch.tensor([10, 900], device=DEV)
    call = counter(3)
    xt, t = BACKEND.noise(x0, t_in, DiffusionArgs(tables, k0, k1, call, mirror=False, pivot=0))
    # check elements at the very end of sample 1 (global offset ~2^31 + 2^21) against the contract
    j = torch.tensor([0, 1, 2, 3, n - 8, n - 5, n - 2, n - 1], dtype=torch.int64)
    for b in range(B):
        w = rng.philox4x32(j // 4, b, 3, rng.STREAM_EPS, k0, k1)
        u = [rng.bits_to_uniform(x) for x in w]
        n01, n23 = rng.box_muller(u[0], u[1]), rng.box_muller(u[2], u[3])
        lanes = torch.stack([n01[0], n01[1], n23[0], n23[1]], -1)
        eps = lanes[torch.arange(len(j)), j % 4]
        tt = int(t_in[b])
        want = tables[ROW_SQRT_AB][tt].cpu() * 0.5 + tables[ROW_SQRT_1MAB][tt].cpu() * eps
        torch.testing.assert_close(xt[b, j.to(DEV)].float().cpu(), want, rtol=2e-3, atol=2e-3)
    del xt
    # fp32 pred: the gradient 2 w eps / n ~ 1e-9 would underflow in fp16
    pred = torch.zeros(B, n, dtype=torch.float32, device=DEV, requires_grad=True)
    per, terms = BACKEND.loss(pred, x0, t, DiffusionArgs(tables, k0, k1, call, 0, False), False)
    w = tables[ROW_WEIGHT][t_in]
    torch.testing.assert_close(per, w, rtol=2e-3, atol=0)  # w * mean(eps^2), n ~ 1e9
    per.sum().backward()
    g_last = pred.grad[1, -1].float()
    assert g_last.abs().item() > 0 and math.isfinite(g_last.item())
    # an eps target: gradient = 2 w (0 - eps) / n
    w1 = tables[ROW_WEIGHT][900].item()
    wx = rng.philox4x32(torch.tensor([(n - 1) // 4]), 1, 3, rng.STREAM_EPS, k0, k1)
    u = [rng.bits_to_uniform(x) for x in wx]
    eps_last = rng.box_muller(u[2], u[3])[1].item()
    assert g_last.item() == pytest.approx(-2 * w1 * eps_last / n, rel=2e-3)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[-1]], ids=lambda s: "x".join(map(str, s)))
def test_gpu_counter_and_determinism_stress(shape):
    """Many back-to-back steps: the counter is exact and a rerun from the same counter gives the
    same bits (fixed-order reduction, no atomics in the sums)."""
    tables = make_tables("v", True)
    k0, k1 = KEY
    B, C = shape[0], shape[1]
    x0 = torch.randn(shape, device=DEV)
    pred = torch.randn(B, 2 * C, *shape[2:], device=DEV)
    steps = 3 if SMOKE else 50
    runs = []
    for _ in range(2):
        call = counter(1000)
        out = []
        for _ in range(steps):
            _, t = BACKEND.noise(x0, None, DiffusionArgs(tables, k0, k1, call, mirror=True, pivot=PIVOT))
            loss, terms = BACKEND.loss(pred, x0, t, DiffusionArgs(tables, k0, k1, call, 1, True), True)
            out.append(torch.cat([loss.view(1), terms.flatten()]))
        assert call.item() == 1000 + steps
        runs.append(torch.stack(out))
    assert torch.equal(runs[0], runs[1])
