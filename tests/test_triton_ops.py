"""The Triton backend against the plain-PyTorch reference, on tiny shapes.

Without a GPU the kernels run through the Triton interpreter (conftest sets TRITON_INTERPRET=1
before anything imports Triton); with one, the same tests run on CUDA. Tolerances: float32 to
rounding; float16/bfloat16 and the ill-conditioned t = 0 NLL by the design's rule: error against
a float64 reference no worse than 2x (plus a rounding floor) the float32/eager reference's own.
"""
import math
import os

import pytest
import torch

from speed_kernels.op_schema import DiffusionArgs

from speed_kernels import reference, rng
from speed_kernels.schedules import NoiseSchedule
from speed_kernels.tables import ROW_SQRT_AB, TARGETS, build_tables

from required import require_module  # noqa: E402  (skip, or fail under SPEED_KERNELS_REQUIRE_ALL=1)

triton = require_module("triton")
tb_mod = require_module("speed_kernels.ops.triton_backend")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
T = 1000
PIVOT = 642
BACKEND = tb_mod.TritonBackend()
KEY = rng.fold_key(0x1234_5678_9ABC_DEF0)  # k0 >= 2^31: the key words go in as bitcast int32


def make_tables(prediction="eps", learn_sigma=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(T, generator=g, dtype=torch.float64) ** 3  # far from uniform
    weights = torch.rand(T, generator=g, dtype=torch.float64) + 0.25
    return build_tables(NoiseSchedule.linear(T), probs, weights, prediction, learn_sigma).to(DEV)


def counter(v=0):
    return torch.tensor([v], dtype=torch.int64, device=DEV)


# The kernels' code paths by per-sample size: (per-sample shape, forced BLOCK or None for the
# shipped block_config, expected (chunks per sample, EVEN)). EVEN drops every mask (the path real
# 4x32x32 latents take) and several chunks exercise the chunk offsets and the per-sample reduction
# over chunk partial sums. The expectation is asserted, so a case cannot drift to another path.
LAYOUTS = {
    "tail-1chunk": ((2, 3, 5), None, (1, False)),  # 30 elements in one masked 64-block
    "even-1chunk": ((1, 8, 8), None, (1, True)),  # 64: the default block, unmasked
    "even-4chunks": ((4, 8, 8), 64, (4, True)),  # 256 = 4 x 64: unmasked, multi-chunk reduction
    "tail-3chunks": ((3, 5, 9), 64, (3, False)),  # 135 = 2 x 64 + 7: the masked last chunk
}


@pytest.fixture(params=list(LAYOUTS), ids=list(LAYOUTS))
def layout(request, monkeypatch):
    """Per-sample shape of x0 for a kernel path; forces the BLOCK through block_config (the one
    place launch_config takes it from), not through the environment."""
    from speed_kernels.ops import noise as N

    shape, block, expect = LAYOUTS[request.param]
    if block is not None:
        monkeypatch.setattr(N, "block_config", lambda n, total: (block, 4))
    n = math.prod(shape)
    assert N.launch_config(n, 3 * n)[2:] == expect, request.param
    return shape


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_rule(ours, ref_lo, ref64, floor):
    """|ours - ref64| <= 2 |ref_lo - ref64| + floor (the design's low-precision rule), the floor
    raised to one unit in the last place of the output dtype at the largest value: both sides
    round the same float32 value, and a 1-ulp float32 difference can flip that rounding."""
    if ours.dtype in (torch.float16, torch.bfloat16):
        floor = max(floor, torch.finfo(ours.dtype).eps * ref64.abs().max().item())
    e, e_ref = max_err(ours, ref64), max_err(ref_lo, ref64)
    assert e <= 2 * e_ref + floor, f"error {e:.3g} vs reference's own {e_ref:.3g} (+{floor:.1g})"


# ----------------------------------------------------------------------------- RNG pieces


import triton.language as tl  # noqa: E402

from speed_kernels.ops import philox as P  # noqa: E402


@triton.jit
def _philox_probe(words_ptr, nrm_ptr, call_ptr, k0, k1, sample, N: tl.constexpr):
    g = tl.arange(0, N).to(tl.uint32) + 0xFFFFFF00  # group indices near the uint32 top
    key0 = k0.to(tl.uint32, bitcast=True)
    key1 = k1.to(tl.uint32, bitcast=True)
    call = P.as_u32(tl.load(call_ptr))
    z = tl.zeros_like(g)
    w0, w1, w2, w3 = P.philox4x32_10(g, z + 3, z + call, z + 1, key0, key1)
    n0, n1, n2, n3 = P.normal4(g, sample, call, key0, key1)
    o = tl.arange(0, N) * 4
    tl.store(words_ptr + o, w0.to(tl.int64))
    tl.store(words_ptr + o + 1, w1.to(tl.int64))
    tl.store(words_ptr + o + 2, w2.to(tl.int64))
    tl.store(words_ptr + o + 3, w3.to(tl.int64))
    tl.store(nrm_ptr + o, n0)
    tl.store(nrm_ptr + o + 1, n1)
    tl.store(nrm_ptr + o + 2, n2)
    tl.store(nrm_ptr + o + 3, n3)


def test_philox_words_and_normals_match_contract():
    N = 8
    call = counter(2**32 + 7)  # the counter word is the low 32 bits of the call index
    words = torch.zeros(4 * N, dtype=torch.int64, device=DEV)
    nrm = torch.zeros(4 * N, device=DEV)
    k0, k1 = KEY
    _philox_probe[(1,)](words, nrm, call, P.split_key(k0), P.split_key(k1), 3, N)
    g = torch.arange(N, dtype=torch.int64) + 0xFFFFFF00
    ref = torch.stack(rng.philox4x32(g, 3, 7, rng.STREAM_EPS, k0, k1), -1).reshape(-1)
    assert torch.equal(words.cpu(), ref)
    u = [rng.bits_to_uniform(x) for x in rng.philox4x32(g, 3, 7, rng.STREAM_EPS, k0, k1)]
    n01 = rng.box_muller(u[0], u[1])
    n23 = rng.box_muller(u[2], u[3])
    ref_n = torch.stack([n01[0], n01[1], n23[0], n23[1]], -1).reshape(-1)
    torch.testing.assert_close(nrm.cpu(), ref_n, rtol=1e-5, atol=2e-6)


# ----------------------------------------------------------------------------- noise op


@triton.jit
def _box_muller_probe(ur_ptr, ua_ptr, out_ptr, N: tl.constexpr):
    o = tl.arange(0, N)
    c, s = P.box_muller(tl.load(ur_ptr + o), tl.load(ua_ptr + o))
    tl.store(out_ptr + o, c)
    tl.store(out_ptr + N + o, s)


def test_box_muller_accuracy_on_every_quadrant_and_the_extremes():
    """Our sin/cos (Cody-Waite + minimax) and rsqrt-based sqrt against float64 truth of the
    contract's formula (theta = float32(u * float32(2 pi))), on random words plus the extremes
    (u = 2^-24, 1 - 2^-24) and the words whose angle sits on a quadrant boundary."""
    N = 1 << 14
    gen = torch.Generator().manual_seed(7)
    words = torch.randint(0, 2**32, (2, N), generator=gen, dtype=torch.int64)
    words[0, :2] = torch.tensor([0, 2**32 - 1])  # smallest and largest u (largest / smallest r)
    # angle words whose u is near k/8 (k = 0..8): quadrant switches and the +-pi/4 ends
    near = torch.tensor([(k << 29) + d for k in range(8) for d in (-1024, -512, 0, 512, 1024)]) & 0xFFFFFFFF
    words[1, 2 : 2 + near.numel()] = near
    ur, ua = rng.bits_to_uniform(words[0]), rng.bits_to_uniform(words[1])
    out = torch.empty(2 * N, device=DEV)
    _box_muller_probe[(1,)](ur.to(DEV), ua.to(DEV), out, N)
    out = out.cpu().double()
    r = torch.sqrt(-2.0 * torch.log(ur.double()))
    theta = (ua * rng.TWO_PI_F32).double()  # float32 product, as the contract says
    want = torch.cat([r * torch.cos(theta), r * torch.sin(theta)])
    err = (out - want).abs() / torch.cat([r, r]).clamp(min=1.0)
    assert err.max().item() < 4e-7, f"max error {err.max().item():.3g} (units: max(r, 1))"
    # and the oracle itself (torch float32) is no closer than a few ulp either
    ref = torch.cat(rng.box_muller(ur, ua)).double()
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("mode", ["draw", "mirror", "given"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_noise_matches_reference(mode, dtype, layout):
    tables = make_tables()
    k0, k1 = KEY
    B, shape = 7, layout
    x0 = torch.randn(B, *shape, device=DEV).to(dtype)
    t_in = torch.tensor([0, 999, 5, 642, 1, 998, 300], device=DEV) if mode == "given" else None
    c_ours, c_ref = counter(11), counter(11)
    xt, t = BACKEND.noise(x0, t_in, DiffusionArgs(tables, k0, k1, c_ours, mirror=mode == "mirror", pivot=PIVOT))
    xr, tr = reference.noise(x0, t_in, tables, k0, k1, c_ref, mode == "mirror", PIVOT)
    assert t.dtype == torch.int64 and torch.equal(t, tr)
    assert xt.dtype == dtype and xt.shape == x0.shape
    assert c_ours.item() == c_ref.item() == 12
    if dtype == torch.float32:
        torch.testing.assert_close(xt, xr, rtol=1e-5, atol=2e-6)
    else:
        x64, _ = reference.noise(x0.double(), tr, tables, k0, k1, counter(11), False, 0)
        assert_rule(xt, xr, x64, floor=1e-6)
    if mode == "mirror":
        n_draw = B // 2 + 1
        assert torch.equal(t[n_draw:], (t[: B - n_draw] - PIVOT).abs())


def test_noise_fresh_per_call_and_given_t_is_copied():
    tables = make_tables()
    k0, k1 = KEY
    x0 = torch.zeros(24, 1, 2, 2, device=DEV)
    call = counter()
    xa, ta = BACKEND.noise(x0, None, DiffusionArgs(tables, k0, k1, call, mirror=False, pivot=0))
    xb, tb = BACKEND.noise(x0, None, DiffusionArgs(tables, k0, k1, call, mirror=False, pivot=0))
    assert call.item() == 2
    assert not torch.equal(ta, tb) and not torch.equal(xa, xb)
    # another seed: another stream
    xc, tc = BACKEND.noise(x0, None, DiffusionArgs(tables, k0 ^ 1, k1, counter(), mirror=False, pivot=0))
    assert not torch.equal(ta, tc)
    t_in = ta.clone()
    _, t2 = BACKEND.noise(x0, t_in, DiffusionArgs(tables, k0, k1, call, mirror=False, pivot=0))
    assert torch.equal(t2, t_in) and t2.data_ptr() != t_in.data_ptr()


def test_noise_noncontiguous_and_differentiable_x0():
    tables = make_tables()
    k0, k1 = KEY
    base = torch.randn(4, 6, 3, device=DEV)
    x0 = base.transpose(1, 2)  # non-contiguous: made contiguous inside
    xt, t = BACKEND.noise(x0, None, DiffusionArgs(tables, k0, k1, counter(3), mirror=False, pivot=0))
    xr, tr = reference.noise(x0, None, tables, k0, k1, counter(3), False, 0)
    assert torch.equal(t, tr)
    torch.testing.assert_close(xt, xr, rtol=1e-5, atol=2e-6)
    x0g = torch.randn(4, 2, 3, device=DEV, requires_grad=True)
    xt, t = BACKEND.noise(x0g, None, DiffusionArgs(tables, k0, k1, counter(), mirror=False, pivot=0))
    xt.sum().backward()
    want = tables[ROW_SQRT_AB][t].view(-1, 1, 1).expand_as(x0g)
    torch.testing.assert_close(x0g.grad, want)


# ----------------------------------------------------------------------------- loss op


def _loss_case(target, learn_sigma, dtype=torch.float32, B=6, shape=(2, 3, 5), seed=0):
    """(tables, x0, t, call, pred) with t[0] = 0 (the NLL branch) and t[1] = 1."""
    torch.manual_seed(seed)
    tables = make_tables(TARGETS[target], learn_sigma, seed)
    k0, k1 = KEY
    x0 = torch.randn(B, *shape, device=DEV).clamp(-1.2, 1.2).to(dtype)  # some pixels past +-0.999
    call = counter(5)
    _, t = reference.noise(x0, None, tables, k0, k1, call, False, 0)
    t[0], t[1] = 0, 1  # the t = 0 NLL branch and its neighbour
    c = shape[0] * (2 if learn_sigma else 1)
    pred = torch.randn(B, c, *shape[1:], device=DEV).to(dtype)
    return tables, x0, t, call, pred


def _backend_loss(pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean):
    """BACKEND.loss with the reference's positional signature (the two are compared side by side)."""
    return BACKEND.loss(pred, x0, t, DiffusionArgs(tables, k0, k1, call, target, learn_sigma), reduce_mean)


def _run(fn, pred, *args, grad_output):
    p = pred.detach().clone().requires_grad_()
    loss, terms = fn(p, *args)
    (g,) = torch.autograd.grad(loss, p, grad_output)
    return loss.detach(), terms, g


@pytest.mark.parametrize("learn_sigma", [False, True], ids=["mse", "learned-sigma"])
@pytest.mark.parametrize("target", [0, 1, 2], ids=TARGETS)
@pytest.mark.parametrize("reduce_mean", [True, False], ids=["mean", "none"])
def test_loss_and_gradient_match_reference(target, learn_sigma, reduce_mean, layout):
    # B = 3 for the multi-chunk layouts: the interpreter's cost is per program
    tables, x0, t, call, pred = _loss_case(target, learn_sigma, B=6 if layout == (2, 3, 5) else 3, shape=layout)
    k0, k1 = KEY
    B = x0.shape[0]
    go = torch.tensor(1.75, device=DEV) if reduce_mean else torch.linspace(-1.0, 2.0, B, device=DEV)
    args = (x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean)
    lo, to, go_ = _run(_backend_loss, pred, *args, grad_output=go)
    lr, tr, gr = _run(reference.loss, pred, *args, grad_output=go)
    assert lo.shape == lr.shape and lo.dtype == torch.float32
    assert to.shape == (2, B) and not to.requires_grad
    assert call.item() == 6  # the loss reads the counter (noise moved it 5 -> 6), it does not move it
    if not learn_sigma:
        torch.testing.assert_close(lo, lr, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(to, tr, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(go_, gr, rtol=1e-5, atol=1e-7)
        assert torch.equal(to[1], torch.zeros(B, device=DEV))
        return
    # learned sigma: t >= 1 to rounding; everything against float64 by the rule (t = 0 NLL).
    l64, t64, g64 = _run(reference.loss, pred.double(), *args, grad_output=go.double())
    torch.testing.assert_close(to[:, 1:], tr[:, 1:], rtol=1e-4, atol=1e-6)
    # per sample (per t) on its own scale: the KL at t >~ 10 is ~1e-5 bits, so a 1 % error in it
    # hides under the absolute tolerances above and under any max-normalised check
    err = (to.double() - t64.double()).abs()
    bound = 2 * (tr.double() - t64.double()).abs() + 2e-5 * t64.double().abs() + 2 * torch.finfo(torch.float32).eps
    assert (err <= bound).all(), f"per-sample terms off: {err[err > bound].tolist()} > {bound[err > bound].tolist()}"
    assert_rule(to, tr, t64, floor=1e-6)
    assert_rule(lo, lr, l64, floor=1e-6)
    assert_rule(go_, gr, g64, floor=1e-7)
    # the out channels get the MSE gradient only (the model mean is detached in the VLB)
    C = x0.shape[1]
    torch.testing.assert_close(go_[:, :C], gr[:, :C], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("learn_sigma", [False, True], ids=["mse", "learned-sigma"])
def test_loss_low_precision(dtype, learn_sigma):
    target = 1
    tables, x0, t, call, pred = _loss_case(target, learn_sigma, dtype)
    k0, k1 = KEY
    go = torch.tensor(1.0, device=DEV)
    args = (x0, t, tables, k0, k1, call, target, learn_sigma, True)
    lo, to, g = _run(_backend_loss, pred, *args, grad_output=go)
    lr, tr, gr = _run(reference.loss, pred, *args, grad_output=go)
    l64, t64, g64 = _run(reference.loss, pred.double(), x0.double(), *args[1:], grad_output=go.double())
    assert g.dtype == dtype
    assert_rule(lo, lr, l64, floor=1e-6)
    assert_rule(to, tr, t64, floor=1e-6)
    assert_rule(g, gr, g64, floor=1e-7)


def test_loss_regenerates_eps_of_latest_call_and_is_deterministic():
    tables = make_tables()
    k0, k1 = KEY
    x0 = torch.randn(4, 2, 3, 3, device=DEV)
    call = counter()
    BACKEND.noise(x0, None, DiffusionArgs(tables, k0, k1, call, mirror=False, pivot=0))
    xt, t = BACKEND.noise(x0, None, DiffusionArgs(tables, k0, k1, call, mirror=False, pivot=0))
    sab = tables[0][t].view(-1, 1, 1, 1)
    s1 = tables[1][t].view(-1, 1, 1, 1)
    eps = (xt - sab * x0) / s1
    # the perfect eps prediction has (almost) zero loss: eps is that of the second call
    loss, terms = BACKEND.loss(eps, x0, t, DiffusionArgs(tables, k0, k1, call, 0, False), True)
    assert loss.item() < 1e-8
    pred = torch.randn_like(x0)
    a, _ = BACKEND.loss(pred, x0, t, DiffusionArgs(tables, k0, k1, call, 0, False), True)
    b, _ = BACKEND.loss(pred, x0, t, DiffusionArgs(tables, k0, k1, call, 0, False), True)
    assert torch.equal(a, b)


def test_no_grad_path_matches():
    tables, x0, t, call, pred = _loss_case(0, True)
    k0, k1 = KEY
    with torch.no_grad():
        a, ta = BACKEND.loss(pred, x0, t, DiffusionArgs(tables, k0, k1, call, 0, True), True)
    b, tb = BACKEND.loss(pred.clone().requires_grad_(), x0, t, DiffusionArgs(tables, k0, k1, call, 0, True), True)
    assert torch.equal(a, b.detach()) and torch.equal(ta, tb) and not a.requires_grad


def test_backward_scaling_in_place_and_retain_graph():
    tables, x0, t, call, pred = _loss_case(0, False)
    k0, k1 = KEY
    p = pred.clone().requires_grad_()
    loss, _ = BACKEND.loss(p, x0, t, DiffusionArgs(tables, k0, k1, call, 0, False), True)
    (g1,) = torch.autograd.grad(loss, p, retain_graph=True)
    g1 = g1.clone()
    (loss * 3).backward(retain_graph=True)
    torch.testing.assert_close(p.grad, 3 * g1)
    p.grad = None
    (loss * -0.5).backward(retain_graph=True)
    torch.testing.assert_close(p.grad, -0.5 * g1)
    p.grad = None
    loss.backward()
    torch.testing.assert_close(p.grad, g1)


def test_scale_grad_strides_over_more_blocks_than_programs(monkeypatch):
    """The in-place rescale walks all blocks with a grid smaller than the block count, skips
    the pass when grad_output equals the applied scale, and records the new scale."""
    from speed_kernels.ops import loss as L

    monkeypatch.setattr(L, "_SCALE_GRID", 2)
    n = 5 * 4096 + 3
    grad = torch.randn(n, device=DEV)
    want = grad.clone()
    state = torch.tensor([1.0, 1.0], device=DEV)
    L.scale_grad_(grad, state, torch.tensor(1.0, device=DEV), 0)  # equal to the scale: no pass
    assert torch.equal(grad, want)
    L.scale_grad_(grad, state, torch.tensor(-2.5, device=DEV), 1)
    torch.testing.assert_close(grad, want * -2.5)
    assert state.tolist() == [-2.5, 1.0]


def test_reduction_none_expanded_grad_output():
    tables, x0, t, call, pred = _loss_case(2, True)
    k0, k1 = KEY
    p = pred.clone().requires_grad_()
    per, _ = BACKEND.loss(p, x0, t, DiffusionArgs(tables, k0, k1, call, 2, True), False)
    per.sum().backward()  # grad_output is a stride-0 expand of a scalar
    pr = pred.clone().requires_grad_()
    ref, _ = reference.loss(pr, x0, t, tables, k0, k1, call, 2, True, False)
    ref.sum().backward()
    C = x0.shape[1]
    torch.testing.assert_close(p.grad[:, :C], pr.grad[:, :C], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p.grad[2:], pr.grad[2:], rtol=1e-4, atol=1e-7)


def test_bad_inputs_raise():
    tables, x0, t, call, pred = _loss_case(0, False)
    k0, k1 = KEY
    with pytest.raises(ValueError, match="pred has shape"):
        BACKEND.loss(pred[:, :1], x0, t, DiffusionArgs(tables, k0, k1, call, 0, False), True)
    with pytest.raises(ValueError, match="2C channels"):
        BACKEND.loss(pred, x0, t, DiffusionArgs(tables, k0, k1, call, 0, True), True)
    with pytest.raises(ValueError, match="t must be int64"):
        BACKEND.loss(pred, x0, t.int(), DiffusionArgs(tables, k0, k1, call, 0, False), True)
    with pytest.raises(ValueError, match="t must be int64"):
        BACKEND.loss(pred, x0, t[:-1], DiffusionArgs(tables, k0, k1, call, 0, False), True)
    with pytest.raises(ValueError, match="target"):
        BACKEND.loss(pred, x0, t, DiffusionArgs(tables, k0, k1, call, 3, False), True)
    with pytest.raises(TypeError, match="float64"):
        BACKEND.noise(x0.double(), None, DiffusionArgs(tables, k0, k1, call, mirror=False, pivot=0))
    with pytest.raises(ValueError, match="tables"):
        BACKEND.noise(x0, None, DiffusionArgs(tables[:4], k0, k1, call, mirror=False, pivot=0))
    with pytest.raises(ValueError, match="call"):
        BACKEND.noise(x0, None, DiffusionArgs(tables, k0, k1, call.int(), mirror=False, pivot=0))
    with pytest.raises(ValueError, match="t_in"):
        BACKEND.noise(x0, t[:2], DiffusionArgs(tables, k0, k1, call, mirror=False, pivot=0))


@pytest.mark.parametrize("learn_sigma", [False, True], ids=["mse", "learned-sigma"])
def test_diffusion_loss_triton_equals_torch(learn_sigma):
    """DiffusionLoss end to end on both backends: the same t, x_t, loss and pred.grad, always
    compared (t = 0 included: its NLL is well conditioned for a prediction near the target)."""
    from speed_kernels.loss import DiffusionLoss

    sched = NoiseSchedule.linear(T)
    g = torch.Generator().manual_seed(5)
    x0 = (torch.rand(6, 2, 4, 4, generator=g) * 2 - 1).to(DEV)
    v = (torch.rand(6, 2, 4, 4, generator=g) * 2 - 1).to(DEV)
    err = 0.05 * torch.randn(6, 2, 4, 4, generator=g).to(DEV)
    out = {}
    for name in ("triton", "torch"):
        fn = DiffusionLoss(sched, strategy="speed", learn_sigma=learn_sigma, backend=name, seed=3)
        x_t, t = fn.noise(x0)
        t_given = torch.tensor([0, 1, 500, 999, 7, 300], device=DEV)
        x_t2, _ = fn.noise(x0, t_given)
        sab = tables_row(fn, "sqrt_ab", t_given)
        s1 = tables_row(fn, "sqrt_1mab", t_given)
        eps = (x_t2 - sab * x0) / s1
        pred = eps + err  # near the target, as a trained model's
        if learn_sigma:
            pred = torch.cat([pred, v], 1)
        pred.requires_grad_()
        loss = fn.loss(pred, x0, t_given)
        loss.backward()
        out[name] = (x_t, t, x_t2, loss.detach(), pred.grad, fn.last_terms["vb"])
    tri, ref = out["triton"], out["torch"]
    assert torch.equal(tri[1], ref[1])
    torch.testing.assert_close(tri[0], ref[0], rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(tri[2], ref[2], rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(tri[3], ref[3], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(tri[4], ref[4], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(tri[5], ref[5], rtol=1e-4, atol=1e-7)  # per sample, t = 0 included


def tables_row(fn, name, t):
    from speed_kernels import tables as tb

    row = {"sqrt_ab": tb.ROW_SQRT_AB, "sqrt_1mab": tb.ROW_SQRT_1MAB}[name]
    return fn.tables(t.device)[row][t].view(-1, 1, 1, 1)


@pytest.mark.parametrize("learn_sigma", [False, True], ids=["mse", "learned-sigma"])
def test_mixed_precision_as_the_trainer_feeds_it(learn_sigma):
    """bf16 autocast: the model's bf16 output with the fp32 latents, through DiffusionLoss on the
    triton backend, against the float64 reference by the low-precision rule; grad in bf16."""
    from speed_kernels.loss import DiffusionLoss

    sched = NoiseSchedule.linear(T)
    g = torch.Generator().manual_seed(11)
    x0 = (torch.rand(4, 2, 4, 4, generator=g) * 2 - 1).to(DEV)
    C = 4 if learn_sigma else 2
    lin = torch.nn.Conv2d(2, C, 1).to(DEV)
    res = {}
    for name in ("triton", "torch"):
        fn = DiffusionLoss(sched, strategy="speed", learn_sigma=learn_sigma, backend=name, seed=8)
        x_t, t = fn.noise(x0)
        with torch.autocast(torch.device(DEV).type, dtype=torch.bfloat16):
            pred = lin(x_t)
        assert pred.dtype == torch.bfloat16 and x0.dtype == torch.float32
        p = pred.detach().requires_grad_()
        loss = fn.loss(p, x0, t)
        loss.backward()
        res[name] = (t, p.detach(), loss.detach(), p.grad, fn)
    t, pred, l_tri, g_tri, fn = res["triton"]
    assert torch.equal(t, res["torch"][0]) and torch.equal(pred, res["torch"][1])
    assert g_tri.dtype == torch.bfloat16 and l_tri.dtype == torch.float32
    # float64 truth on the same bf16 prediction
    p64 = pred.double().requires_grad_()
    tab = fn.tables(DEV)
    call = fn._counter(DEV)
    l64, _ = reference.loss(p64, x0.double(), t, tab, fn.k0, fn.k1, call, 0, learn_sigma, True)
    l64.backward()
    assert_rule(l_tri, res["torch"][2], l64.detach(), floor=1e-6)
    assert_rule(g_tri, res["torch"][3], p64.grad, floor=1e-7)


def test_supports():
    assert BACKEND.supports(torch.device("cuda")) or not torch.cuda.is_available()
    assert BACKEND.supports(torch.device("cpu")) == (os.environ.get("TRITON_INTERPRET") == "1")


def test_registered_ops_match_eager_path_and_pass_opcheck():
    """The torch.library ops (what torch.compile traces) against the eager path."""
    tables, x0, t, call, pred = _loss_case(1, True)
    k0, k1 = KEY
    args = (x0, t, tables, k0, k1, call, 1, True, True)
    ops = torch.ops.speed_kernels
    p = pred.clone().requires_grad_()
    loss, terms, _ = ops.loss.triton(p, *args, True)
    (loss * 2).backward()
    le, te, ge = _run(_backend_loss, pred, *args, grad_output=torch.tensor(2.0, device=DEV))
    assert torch.equal(loss.detach(), le) and torch.equal(terms, te)
    torch.testing.assert_close(p.grad, ge)
    # reduction none: backward through loss_backward.triton
    p = pred.clone().requires_grad_()
    per, _, empty = ops.loss.triton(p, x0, t, tables, k0, k1, call, 1, True, False, False)
    assert empty.numel() == 0
    go = torch.linspace(-1.0, 2.0, x0.shape[0], device=DEV)
    (gn,) = torch.autograd.grad(per, p, go)
    ln, _, gr = _run(_backend_loss, pred, *args[:-1], False, grad_output=go)
    assert torch.equal(per.detach(), ln)
    torch.testing.assert_close(gn, gr)
    c1, c2 = counter(9), counter(9)
    xa, ta = ops.noise.triton(x0, None, tables, k0, k1, c1, True, PIVOT)
    xb, tb = BACKEND.noise(x0, None, DiffusionArgs(tables, k0, k1, c2, mirror=True, pivot=PIVOT))
    assert torch.equal(ta, tb) and torch.equal(xa, xb) and c1.item() == c2.item() == 10
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    for reduce_mean in (True, False):
        torch.library.opcheck(ops.loss.triton, (pred.clone().requires_grad_(), *args[:-1], reduce_mean, reduce_mean),
                              test_utils=utils)
    torch.library.opcheck(ops.noise.triton, (x0, None, tables, k0, k1, counter(), False, 0), test_utils=utils)
    torch.library.opcheck(ops.loss_backward.triton, (go, pred, x0, t, tables, k0, k1, call, 1, True), test_utils=utils)
    with pytest.raises(ValueError, match="with_grad needs reduce_mean"):
        ops.loss.triton(pred, x0, t, tables, k0, k1, call, 1, True, False, True)


def test_counter_advances_and_the_loss_depends_only_on_the_call_index(monkeypatch):
    """The counter moves by one per noise call (stream-ordered add after the launch), and a loss
    scored at the same call index on another counter tensor is bit-identical (fixed-order reduction)."""
    monkeypatch.setenv("SPEED_TRITON_BLOCK", "64")  # several programs per sample
    tables = make_tables("eps", True)
    k0, k1 = KEY
    x0 = torch.randn(3, 2, 9, 7, device=DEV)
    pred = torch.randn(3, 4, 9, 7, device=DEV)
    call = counter(40)
    losses = []
    for i in range(3):
        _, t = BACKEND.noise(x0, None, DiffusionArgs(tables, k0, k1, call, mirror=False, pivot=0))
        loss, terms = BACKEND.loss(pred, x0, t, DiffusionArgs(tables, k0, k1, call, 0, True), True)
        losses.append(loss)
        assert call.item() == 41 + i
    other = counter(42)
    _, t = BACKEND.noise(x0, None, DiffusionArgs(tables, k0, k1, other, mirror=False, pivot=0))
    loss, _ = BACKEND.loss(pred, x0, t, DiffusionArgs(tables, k0, k1, other, 0, True), True)
    assert torch.equal(loss, losses[-1])
    assert not torch.equal(losses[0], losses[1])


