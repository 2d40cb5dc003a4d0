"""The compiled `cpp` backend (speed_kernels._C on CPU) against the plain-PyTorch reference.

Skipped with the reason from speed_kernels._ext when the extension is not built, except under
SPEED_KERNELS_REQUIRE_EXT=1 (CI), where a missing extension fails every test here.
"""
import math
import os

import pytest
import torch

from speed_kernels.op_schema import DiffusionArgs

from speed_kernels import _ext, reference, rng
from speed_kernels import tables as tb
from speed_kernels.schedules import NoiseSchedule

# SPEED_KERNELS_REQUIRE_ALL=1 (CI) requires every component, the extension included
REQUIRE = os.environ.get("SPEED_KERNELS_REQUIRE_EXT") == "1" or os.environ.get("SPEED_KERNELS_REQUIRE_ALL") == "1"


@pytest.fixture(autouse=True)
def _need_extension():
    info = _ext.available()
    if not info["built"]:
        if REQUIRE:
            pytest.fail(f"SPEED_KERNELS_REQUIRE_EXT=1 but the extension is missing: {info['error']}")
        pytest.skip(info["error"])


def _ops():
    return torch.ops.speed_kernels


def _cpu_has_avx2_fma() -> bool:
    """From /proc/cpuinfo, independently of the extension's own detection."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


@pytest.fixture(params=["native", "generic"])
def isa(request, monkeypatch):
    """Run a test on the loop variant the CPU picks (AVX2+FMA where it has them) and on the
    portable one (SPEED_KERNELS_CPU_ISA=generic), and check the extension really took it."""
    from speed_kernels import _C

    if request.param == "generic":
        monkeypatch.setenv("SPEED_KERNELS_CPU_ISA", "generic")
        assert _C.cpu_isa() == "generic"
    else:
        monkeypatch.delenv("SPEED_KERNELS_CPU_ISA", raising=False)
        assert _C.cpu_isa() == ("avx2" if _cpu_has_avx2_fma() else "generic")
    return request.param


def _cpp():
    return _ext.backend("cpp")


SCHED = NoiseSchedule.linear()
T = 1000


def make_tables(target=0, learn_sigma=False, seed=0, zeros=True):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(T, generator=g, dtype=torch.float64) ** 3
    if zeros:
        probs[100:130] = 0.0  # flat CDF stretches: ties in the inverse-CDF search
    weights = torch.rand(T, generator=g, dtype=torch.float64) + 0.25
    return tb.build_tables(SCHED, probs, weights, tb.TARGETS[target], learn_sigma)


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


KEYS = rng.fold_key(0x1234_5678_9ABC_DEF0, 3)


# ----------------------------------------------------------------------------- RNG contract
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers(ctr, key, want):
    from speed_kernels import _C

    assert tuple(_C.philox4x32(*ctr, *key)) == want


def test_philox_matches_rng_module_on_random_counters():
    from speed_kernels import _C

    g = torch.Generator().manual_seed(1)
    c = torch.randint(0, 2**32, (50, 6), generator=g, dtype=torch.int64)
    ref = torch.stack(rng.philox4x32(c[:, 0], c[:, 1], c[:, 2], c[:, 3], 0, 0), 1)
    for i in range(50):
        k0, k1 = int(c[i, 4]), int(c[i, 5])
        ref_i = [int(w) for w in rng.philox4x32(c[i, 0], c[i, 1], c[i, 2], c[i, 3], k0, k1)]
        assert _C.philox4x32(*[int(v) for v in c[i, :4]], k0, k1) == ref_i
    assert ref.shape == (50, 4)


@pytest.mark.parametrize("seed,rank", [(0, 0), (123, 0), (2**64 - 1, 5), (0x0123456789ABCDEF, 17)])
def test_fold_key_matches(seed, rank):
    from speed_kernels import _C

    assert tuple(_C.fold_key(seed, rank)) == rng.fold_key(seed, rank)


def test_group_normals_match_reference_conversion():
    from speed_kernels import _C

    k0, k1 = KEYS
    eps = rng.normal_per_element(3, 4 * 40, torch.tensor(7), k0, k1)
    for s in range(3):
        for g in range(40):
            got = torch.tensor(_C.group_normals(g, s, 7, k0, k1))
            torch.testing.assert_close(got, eps[s, 4 * g : 4 * g + 4], rtol=2e-6, atol=2e-6)


# ----------------------------------------------------------------------------- noise op
@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.parametrize("batch", [1, 2, 3, 8, 65, 256])
def test_timesteps_bit_identical(batch, mirror):
    tab = make_tables()
    k0, k1 = KEYS
    x0 = torch.zeros(batch, 1, 2, 2)
    for call0, pivot in [(0, 642), (5, 0), (2**32 + 3, 999), (77, 500)]:
        c_ref, c_cpp = torch.tensor([call0]), torch.tensor([call0])
        _, t_ref = reference.noise(x0, None, tab, k0, k1, c_ref, mirror, pivot)
        _, t_cpp = _ops().noise(x0, None, tab, k0, k1, c_cpp, mirror, pivot)
        assert t_cpp.dtype == torch.int64
        assert torch.equal(t_cpp, t_ref), (call0, pivot)
        assert c_cpp.item() == call0 + 1


def test_timesteps_follow_probs():
    """Chi-square of 20K draws against a coarse-binned probs table (statistical sanity of the draw)."""
    tab = make_tables(seed=3)
    probs = torch.diff(tab[tb.ROW_CDF].double(), prepend=torch.zeros(1, dtype=torch.float64))
    x0 = torch.zeros(20000, 1)
    _, t = _ops().noise(x0, None, tab, *KEYS, torch.tensor([0]), False, 0)
    counts = torch.bincount(t, minlength=T).double().view(20, 50).sum(1)
    expect = probs.view(20, 50).sum(1) * 20000
    chi2 = ((counts - expect) ** 2 / expect).sum().item()
    assert chi2 < 50.0  # 19 dof: p ~ 1e-4


SHAPES = [(5, 3, 7, 5), (4, 3, 32, 32), (3, 1, 1, 3), (2, 4, 9, 8)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("given_t", [False, True])
def test_noise_matches_reference(shape, dtype, given_t, isa):
    tab = make_tables()
    k0, k1 = KEYS
    g = torch.Generator().manual_seed(4)
    x0 = (torch.rand(shape, generator=g) * 2 - 1).to(dtype)
    t_in = torch.randint(0, T, (shape[0],), generator=g) if given_t else None
    if given_t:
        t_in[0] = 0
        t_in[-1] = T - 1
    c_ref, c_cpp = torch.tensor([11]), torch.tensor([11])
    x_ref, t_ref = reference.noise(x0, t_in, tab, k0, k1, c_ref, True, 642)
    x_cpp, t_cpp = _ops().noise(x0, t_in, tab, k0, k1, c_cpp, True, 642)
    assert torch.equal(t_cpp, t_ref)
    assert x_cpp.dtype == dtype and x_cpp.shape == x0.shape
    assert c_cpp.item() == c_ref.item() == 12
    if dtype == torch.float32:
        torch.testing.assert_close(x_cpp, x_ref, rtol=1e-5, atol=2e-6)
    else:  # both round the same float32 value (to float rounding) once: at most one ulp apart
        torch.testing.assert_close(x_cpp.float(), x_ref.float(), rtol=torch.finfo(dtype).eps, atol=1e-5)
    if given_t:
        assert t_cpp.data_ptr() != t_in.data_ptr()  # an output never aliases an input


def test_noise_eps_is_the_contract_eps():
    """sqrt_ab = 0, sqrt_1mab = 1: x_t is eps itself, element for element (tail groups included)."""
    tab = make_tables().clone()
    tab[tb.ROW_SQRT_AB] = 0.0
    tab[tb.ROW_SQRT_1MAB] = 1.0
    k0, k1 = KEYS
    x0 = torch.randn(6, 3, 11, 13)
    x_t, _ = _ops().noise(x0, None, tab, k0, k1, torch.tensor([4]), False, 0)
    eps = rng.normal_per_element(6, 3 * 11 * 13, torch.tensor(4), k0, k1).view_as(x0)
    torch.testing.assert_close(x_t, eps, rtol=2e-6, atol=2e-6)
    # and the draw is standard normal
    big, _ = _ops().noise(torch.zeros(64, 4096), None, tab, k0, k1, torch.tensor([0]), False, 0)
    assert abs(big.mean().item()) < 0.01 and abs(big.std().item() - 1) < 0.01


def test_call_counter_advances_and_streams_differ():
    tab = make_tables()
    call = torch.tensor([0])
    x0 = torch.zeros(4, 8)
    a, ta = _ops().noise(x0, None, tab, *KEYS, call, False, 0)
    b, tb_ = _ops().noise(x0, None, tab, *KEYS, call, False, 0)
    assert call.item() == 2
    assert not torch.equal(a, b)
    pred = torch.zeros(4, 8)
    before = call.clone()
    _ops().loss(pred, x0, tb_, tab, *KEYS, call, 0, False, True, False)
    assert torch.equal(call, before)  # loss reads call - 1, never writes


# ----------------------------------------------------------------------------- loss op
CASES = [(target, ls) for target in (0, 1, 2) for ls in (False, True)]


def _inputs(target, learn_sigma, dtype=torch.float32, shape=(9, 3, 7, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    tab = make_tables(target, learn_sigma, seed=seed)
    k0, k1 = KEYS
    B, C = shape[:2]
    x0 = torch.rand(shape, generator=g) * 2 - 1
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # the discretized-likelihood edge bins
    x0 = x0.to(dtype)
    call = torch.tensor([5])
    _, t = reference.noise(x0, None, tab, k0, k1, call.clone(), True, 642)
    t[0], t[1], t[2] = 0, 1, T - 1
    # a prediction near its target (as a trained model's), plus variance channels in [-1, 1]
    eps = rng.normal_per_element(B, x0[0].numel(), torch.tensor(5), k0, k1).view(shape)
    ab = tab[tb.ROW_SQRT_AB][t].view(-1, *([1] * (len(shape) - 1))) ** 2
    tgt = {0: eps, 1: ab.sqrt() * eps - (1 - ab).sqrt() * x0.float(), 2: x0.float()}[target]
    out = tgt + 0.05 * torch.randn(shape, generator=g)
    if learn_sigma:
        out = torch.cat([out, torch.rand(shape, generator=g) * 2 - 1], 1)
    return out.to(dtype), x0, t, tab, k0, k1, torch.tensor([6])


@pytest.mark.parametrize("reduce_mean", [True, False])
@pytest.mark.parametrize("target,learn_sigma", CASES)
def test_loss_and_grad_match_reference(target, learn_sigma, reduce_mean, isa):
    pred, x0, t, tab, k0, k1, call = _inputs(target, learn_sigma)
    p_ref = pred.clone().requires_grad_()
    p_cpp = pred.clone().requires_grad_()
    l_ref, terms_ref = reference.loss(p_ref, x0, t, tab, k0, k1, call, target, learn_sigma, reduce_mean)
    l_cpp, terms_cpp = _cpp().loss(p_cpp, x0, t, DiffusionArgs(tab, k0, k1, call, target, learn_sigma), reduce_mean)
    assert l_cpp.shape == l_ref.shape and l_cpp.dtype == torch.float32
    assert terms_cpp.shape == (2, x0.shape[0]) and not terms_cpp.requires_grad
    assert relerr(l_cpp, l_ref) < 2e-5
    assert relerr(terms_cpp[0], terms_ref[0]) < 2e-5
    if learn_sigma:
        assert relerr(terms_cpp[1], terms_ref[1]) < 2e-5
        p64 = pred.double().requires_grad_()
        l64, terms64 = reference.loss(p64, x0.double(), t, tab, k0, k1, call, target, True, reduce_mean)
        assert_per_sample(terms_cpp[1], terms_ref[1], terms64[1], "VLB")
        assert_per_sample(terms_cpp[0], terms_ref[0], terms64[0], "MSE")
        if not reduce_mean:
            assert_per_sample(l_cpp, l_ref, l64, "per-sample loss")
    else:
        assert torch.equal(terms_cpp[1], torch.zeros_like(terms_cpp[1]))
    g = torch.rand(l_ref.shape, generator=torch.Generator().manual_seed(9)) + 0.5
    (l_ref * g).sum().backward()
    (l_cpp * g).sum().backward()
    if not learn_sigma:
        assert relerr(p_cpp.grad, p_ref.grad) < 2e-5
    else:
        # The t = 0 likelihood differences two nearby CDF values: float32 rounding of eps is
        # amplified there, in the reference as much as here. Judge both against float64.
        p64 = pred.double().requires_grad_()
        l64, _ = reference.loss(p64, x0.double(), t, tab, k0, k1, call, target, learn_sigma, reduce_mean)
        (l64 * g.double()).sum().backward()
        scale = p64.grad.abs().max().item()
        err_cpp = (p_cpp.grad.double() - p64.grad).abs().max().item() / scale
        err_ref = (p_ref.grad.double() - p64.grad).abs().max().item() / scale
        assert err_cpp <= 2 * err_ref + 2e-6, (err_cpp, err_ref)
        assert relerr(p_cpp.grad, p_ref.grad) < 1e-4
        # each sample's gradient on its own scale (t >= 1: no ill-conditioned NLL there)
        assert per_sample_relerr(p_cpp.grad[t > 0], p_ref.grad[t > 0]) < 2e-5


def test_learned_sigma_t0_nll_gradient_per_sample():
    """Every sample at t = 0: the discretized-Gaussian NLL and its gradient, per sample."""
    pred, x0, t, tab, k0, k1, call = _inputs(0, True, seed=2)
    t = torch.zeros_like(t)
    p_ref, p_cpp = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    l_ref, _ = reference.loss(p_ref, x0, t, tab, k0, k1, call, 0, True, False)
    l_cpp, _ = _cpp().loss(p_cpp, x0, t, DiffusionArgs(tab, k0, k1, call, 0, True), False)
    torch.testing.assert_close(l_cpp, l_ref, rtol=2e-5, atol=1e-6)
    l_ref.sum().backward()
    l_cpp.sum().backward()
    assert relerr(p_cpp.grad, p_ref.grad) < 2e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("target,learn_sigma", CASES)
def test_low_precision_inputs(dtype, target, learn_sigma, isa):
    """fp16/bf16 in, fp32 arithmetic: the loss as accurate as fp32; the gradient rounded once."""
    pred, x0, t, tab, k0, k1, call = _inputs(target, learn_sigma, dtype=dtype, seed=1)
    p_ref, p_cpp = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    l_ref, _ = reference.loss(p_ref, x0, t, tab, k0, k1, call, target, learn_sigma, True)
    l_cpp, _ = _cpp().loss(p_cpp, x0, t, DiffusionArgs(tab, k0, k1, call, target, learn_sigma), True)
    assert relerr(l_cpp, l_ref) < 2e-5
    l_ref.backward()
    l_cpp.backward()
    assert p_cpp.grad.dtype == dtype
    # float64 ground truth on the same (rounded) inputs
    p64 = pred.double().requires_grad_()
    l64, _ = reference.loss(p64, x0.double(), t, tab, k0, k1, call, target, learn_sigma, True)
    l64.backward()
    err_cpp = (p_cpp.grad.double() - p64.grad).abs().max().item()
    err_ref = (p_ref.grad.double() - p64.grad).abs().max().item()
    ulp = torch.finfo(dtype).eps * p64.grad.abs().max().item()
    assert err_cpp <= 2 * err_ref + ulp


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_no_worse_than_eager(dtype):
    """ε-MSE in bf16/fp16: our error against float64 at most 2x that of eager PyTorch in the dtype."""
    pred, x0, t, tab, k0, k1, call = _inputs(0, False, dtype=dtype, seed=3)
    B = x0.shape[0]
    eps = rng.normal_per_element(B, x0[0].numel(), call - 1, k0, k1).view(x0.shape)
    w = tab[tb.ROW_WEIGHT][t]
    p_e = pred.clone().requires_grad_()
    l_e = (((p_e - eps.to(dtype)) ** 2).mean(dim=(1, 2, 3)) * w.to(dtype)).mean()  # eager, in the dtype
    l_e.backward()
    p64 = pred.double().requires_grad_()
    l64 = (((p64 - eps.double()) ** 2).mean(dim=(1, 2, 3)) * w.double()).mean()
    l64.backward()
    p_c = pred.clone().requires_grad_()
    l_c, _ = _cpp().loss(p_c, x0, t, DiffusionArgs(tab, k0, k1, call, 0, False), True)
    l_c.backward()
    assert abs(l_c.item() - l64.item()) <= 2 * abs(l_e.float().item() - l64.item()) + 1e-6 * abs(l64.item())
    err_c = (p_c.grad.double() - p64.grad).abs().max().item()
    err_e = (p_e.grad.double() - p64.grad).abs().max().item()
    assert err_c <= 2 * err_e


def test_mixed_dtypes_bf16_pred_fp32_x0(isa):
    """autocast: the model outputs bf16 while the latents stay fp32."""
    pred, x0, t, tab, k0, k1, call = _inputs(0, True, seed=4)
    pred = pred.to(torch.bfloat16)
    p_ref, p_cpp = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    l_ref, _ = reference.loss(p_ref, x0, t, tab, k0, k1, call, 0, True, True)
    l_cpp, _ = _cpp().loss(p_cpp, x0, t, DiffusionArgs(tab, k0, k1, call, 0, True), True)
    assert relerr(l_cpp, l_ref) < 2e-5
    l_ref.backward()
    l_cpp.backward()
    torch.testing.assert_close(p_cpp.grad.float(), p_ref.grad.float(), rtol=1.6e-2, atol=1e-6)


def test_reduction_none_backward_after_more_noise_calls():
    """reduction none recomputes the gradient in backward from a snapshot of the counter."""
    pred, x0, t, tab, k0, k1, call = _inputs(1, False)
    p_ref, p_cpp = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    l_ref, _ = reference.loss(p_ref, x0, t, tab, k0, k1, call, 1, False, False)
    l_cpp, _ = _cpp().loss(p_cpp, x0, t, DiffusionArgs(tab, k0, k1, call, 1, False), False)
    _ops().noise(x0, None, tab, k0, k1, call, False, 0)  # advances the live counter
    l_ref.sum().backward()
    l_cpp.sum().backward()
    assert relerr(p_cpp.grad, p_ref.grad) < 2e-5


def test_no_grad_path_writes_no_gradient():
    pred, x0, t, tab, k0, k1, call = _inputs(0, False)
    with torch.no_grad():
        l, terms = _cpp().loss(pred.requires_grad_(), x0, t, DiffusionArgs(tab, k0, k1, call, 0, False), True)
    assert not l.requires_grad
    out = _ops().loss(pred.detach(), x0, t, tab, k0, k1, call, 0, False, True, False)
    assert out[2].numel() == 0


def test_results_do_not_depend_on_threads_or_isa(monkeypatch):
    from speed_kernels import _C

    pred, x0, t, tab, k0, k1, call = _inputs(0, True, shape=(16, 4, 16, 16))
    monkeypatch.delenv("SPEED_KERNELS_CPU_ISA", raising=False)
    # the "fast" side below is the AVX2 variant wherever the CPU has it (else this compares the
    # portable loops with themselves and proves nothing about the AVX2 ones)
    assert _C.cpu_isa() == ("avx2" if _cpu_has_avx2_fma() else "generic")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _ops().loss(pred, x0, t, tab, k0, k1, call, 0, True, True, True)
        torch.set_num_threads(max(2, threads))
        two = _ops().loss(pred, x0, t, tab, k0, k1, call, 0, True, True, True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)  # deterministic: fixed summation order per sample
    monkeypatch.setenv("SPEED_KERNELS_CPU_ISA", "generic")
    gen = _ops().loss(pred, x0, t, tab, k0, k1, call, 0, True, True, True)
    xg, tg = _ops().noise(x0, None, tab, k0, k1, torch.tensor([3]), True, 642)
    monkeypatch.delenv("SPEED_KERNELS_CPU_ISA")
    xv, tv = _ops().noise(x0, None, tab, k0, k1, torch.tensor([3]), True, 642)
    assert torch.equal(tg, tv)
    torch.testing.assert_close(xg, xv, rtol=1e-5, atol=2e-6)
    assert relerr(gen[0], one[0]) < 1e-5
    assert relerr(gen[2], one[2]) < 1e-5


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    pred, x0, t, tab, k0, k1, call = _inputs(0, False)
    ops = _ops()
    with pytest.raises(TypeError, match="x0 must be float32"):
        ops.noise(x0.double(), None, tab, k0, k1, call, False, 0)
    with pytest.raises(TypeError, match="tables must be float32"):
        ops.noise(x0, None, tab.double(), k0, k1, call, False, 0)
    with pytest.raises(ValueError, match="tables must be"):
        ops.noise(x0, None, tab[:2], k0, k1, call, False, 0)
    with pytest.raises(TypeError, match="call must be an int64"):
        ops.noise(x0, None, tab, k0, k1, call.int(), False, 0)
    with pytest.raises(ValueError, match="t_in"):
        ops.noise(x0, torch.full((x0.shape[0],), T), tab, k0, k1, call, False, 0)
    with pytest.raises(ValueError, match="t_in"):
        ops.noise(x0, torch.zeros(x0.shape[0] + 1, dtype=torch.long), tab, k0, k1, call, False, 0)
    with pytest.raises(ValueError, match="pivot"):
        ops.noise(x0, None, tab, k0, k1, call, True, T)
    with pytest.raises(ValueError, match="k0"):
        ops.noise(x0, None, tab, 2**32, k1, call, False, 0)
    with pytest.raises(ValueError, match="pred must have"):
        ops.loss(pred[:, :2], x0, t, tab, k0, k1, call, 0, False, True, True)
    with pytest.raises(ValueError, match=r"\[B, 2C"):
        ops.loss(pred, x0, t, make_tables(0, True), k0, k1, call, 0, True, True, True)
    with pytest.raises(ValueError, match="target"):
        ops.loss(pred, x0, t, tab, k0, k1, call, 3, False, True, True)
    with pytest.raises(ValueError, match="outside"):
        ops.loss(pred, x0, t - 1 - t.max(), tab, k0, k1, call, 0, False, True, True)
    with pytest.raises(TypeError, match="pred must be float32"):
        ops.loss(pred.double(), x0, t, tab, k0, k1, call, 0, False, True, True)
    with pytest.raises(ValueError, match="requires grad"):
        _cpp().loss(pred, x0.requires_grad_(), t, DiffusionArgs(tab, k0, k1, call, 0, False), True)
    # nothing of the above advanced the counter
    assert call.item() == 6


def test_same_errors_as_torch_backend_through_diffusion_loss():
    from speed_kernels import DiffusionLoss

    x0 = torch.randn(4, 3, 8, 8)
    for bad, exc in [
        (lambda f: f.noise(x0, torch.full((4,), 5000)), ValueError),
        (lambda f: f.noise(x0[0, 0, 0]), ValueError),
        (lambda f: f.loss(torch.randn(4, 2, 8, 8), x0, torch.zeros(4, dtype=torch.long)), ValueError),
    ]:
        errs = []
        for backend in ("torch", "cpp"):
            f = DiffusionLoss(SCHED, "speed", backend=backend, seed=1)
            f.noise(x0)
            with pytest.raises(exc) as info:
                bad(f)
            errs.append(type(info.value))
        assert errs[0] is errs[1]


# ----------------------------------------------------------------------------- integration
def test_backend_registry_and_diffusion_loss_end_to_end():
    from speed_kernels import DiffusionLoss
    from speed_kernels.backends import backends, select

    assert backends()["cpp"] == "available"
    assert select("auto", torch.device("cpu")).name == "cpp"
    x0 = torch.randn(16, 4, 8, 8)
    res = {}
    for backend in ("torch", "cpp"):
        f = DiffusionLoss(SCHED, "speed", learn_sigma=True, backend=backend, seed=42)
        x_t, t = f.noise(x0)
        pred = torch.cat([x_t * 0.1, torch.zeros_like(x_t)], 1).requires_grad_()
        loss = f.loss(pred, x0, t)
        loss.backward()
        res[backend] = (t, x_t, loss.detach(), pred.grad)
    assert torch.equal(res["cpp"][0], res["torch"][0])
    torch.testing.assert_close(res["cpp"][1], res["torch"][1], rtol=1e-5, atol=2e-6)
    assert relerr(res["cpp"][2], res["torch"][2]) < 2e-5
    assert relerr(res["cpp"][3], res["torch"][3]) < 2e-5


def test_opcheck_schema_fake_and_autograd_registration():
    """torch.library.opcheck: schema (mutation of call), fake kernels, autograd registration, AOT dispatch."""
    pred, x0, t, tab, k0, k1, call = _inputs(0, True, shape=(3, 2, 4, 4))
    ops = _ops()
    torch.library.opcheck(ops.noise.default, (x0, None, tab, k0, k1, call.clone(), True, 2))
    torch.library.opcheck(ops.noise.default, (x0, t, tab, k0, k1, call.clone(), False, 0))
    for reduce_mean in (True, False):
        args = (pred.clone().requires_grad_(), x0, t, tab, k0, k1, call, 0, True, reduce_mean, reduce_mean)
        torch.library.opcheck(ops.loss.default, args)
    torch.library.opcheck(ops.loss_backward.default, (torch.rand(3), pred, x0, t, tab, k0, k1, call, 0, True))


def test_torch_compile_traces_the_ops():
    pred, x0, t, tab, k0, k1, call = _inputs(2, False, shape=(4, 2, 4, 4))
    be = _cpp()

    def step(x0, pred, call):
        x_t, tt = be.noise(x0, None, DiffusionArgs(tab, k0, k1, call, mirror=False, pivot=0))
        loss, terms = be.loss(pred, x0, tt, DiffusionArgs(tab, k0, k1, call, 2, False), True)
        return loss, x_t

    c1, c2 = call.clone(), call.clone()
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    eager_loss, eager_xt = step(x0, p1, c1)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    comp_loss, comp_xt = compiled(x0, p2, c2)
    assert torch.equal(c1, c2)
    assert torch.equal(comp_xt, eager_xt)
    assert torch.equal(comp_loss, eager_loss)
    eager_loss.backward()
    comp_loss.backward()
    assert torch.equal(p1.grad, p2.grad)


def test_eps_cache_is_bit_identical_to_regeneration(monkeypatch):
    """The CPU eps cache (noise writes eps, the matching loss reads it) changes no bit."""
    pred, x0, t, tab, k0, k1, _ = _inputs(1, True, shape=(6, 3, 9, 7))
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("SPEED_KERNELS_CPU_EPS_CACHE", flag)
        call = torch.tensor([20])
        x_t, tt = _ops().noise(x0, None, tab, k0, k1, call, True, 642)
        fwd = _ops().loss(pred, x0, tt, tab, k0, k1, call, 1, True, True, True)
        bwd = _ops().loss_backward(torch.rand(6, generator=torch.Generator().manual_seed(0)), pred, x0, tt, tab, k0, k1,
                                   call, 1, True)
        # a loss for another call (cache miss) must regenerate, not reuse
        other = _ops().loss(pred, x0, tt, tab, k0, k1, call + 1, 1, True, True, True)
        outs[flag] = (x_t, tt, *fwd, bwd, *other)
    for a, b in zip(outs["1"], outs["0"]):
        assert torch.equal(a, b)
    assert not torch.equal(outs["1"][2], outs["1"][6])  # call + 1 gave a different loss
