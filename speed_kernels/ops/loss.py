"""Loss op: regenerate eps of the last noise call, weighted loss, and d loss / d pred in one pass.

Kernel (`_loss_kernel`), same flat (sample, chunk) grid as the noise op:
  * loads pred (2C channels with learned sigma: the `out` half and the `v` half of a sample are
    the first and second n elements of its 2n block), x0 only when the target needs it (v, x0,
    learned sigma), regenerates eps from the same Philox counters only when needed (eps, v,
    learned sigma);
  * writes the per-(sample, chunk) partial sums of the squared error and of the VLB to a small
    float32 buffer [2, B * n_chunks];
  * with reduction "mean" also writes the gradient of the batch-mean loss w.r.t. pred, in pred's
    dtype, in the same pass;
  * a separate one-program `_finalize_kernel` reduces the partials in a fixed order: per-sample
    terms, the per-sample losses or the batch mean, the gradient-scale state, the call index
    used. Deterministic run to run. (Folding it into the loss kernel through last-program tickets
    measured no faster on an H100 and was removed.)
Grid: B * ceil(n / BLOCK) programs, BLOCK = 4096 elements with 8 warps (1024 with 4 warps for a
batch under 4M elements; see block_config): 16 (8) elements = 4 (2) Philox groups per thread.

Backward of reduction "mean" multiplies the saved gradient by grad_output *in place* (one
launch), reading grad_output on the device and skipping the pass when it equals the scale already
applied (1 after the forward): no host sync, and with the usual grad_output = 1 the backward
moves no data, so the loss path stays at 4 compulsory passes. The saved gradient is then handed
to autograd as is (AccumulateGrad adopts the buffer: no copy). A second backward through the same
graph (retain_graph=True) rescales by the ratio of the two grad_outputs; a gradient returned by
an earlier backward (torch.autograd.grad with retain_graph) shares that buffer.
(Under torch.compile tracing the backward is the plain out-of-place `grad * grad_output`.)
Reduction "none" computes the gradient in backward with the per-sample grad_output, by the same
kernel in gradient-only mode.

t outside [0, T): no host check on CUDA (it would sync); the kernels clamp the table index (never
an out-of-bounds read) and return NaN for that sample's loss terms and gradient (and so for the
batch mean), as the cuda backend does. speed_kernels.loss.DiffusionLoss checks on the host for
CPU tensors.

Learned sigma (DiT / guided-diffusion hybrid): loss = w[t] * MSE(out) + VLB, VLB per element =
KL(q(x_{t-1}|x_t, x0) || N(mean_model, exp(logvar_model))) with mean_model computed from the
detached `out` (through x0_hat = a x_t + b out, the mean difference formed as c_x0 (x0 - x0_hat))
and x_t = sqrt(ab) x0 + sqrt(1-ab) eps recomputed in fp32; at t = 0 the
discretized-Gaussian NLL of x0. d/d out comes from the MSE only, d/d v from the VLB only.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..tables import (
    ROW_LOG_BETA,
    ROW_POST_LOGVAR,
    ROW_POST_X0,
    ROW_POST_XT,
    ROW_SQRT_1MAB,
    ROW_SQRT_AB,
    ROW_WEIGHT,
    ROW_X0HAT_OUT,
    ROW_X0HAT_XT,
)
from . import philox as P

# Globals read inside kernels must be tl.constexpr objects (see noise.py).
ROW_LOG_BETA = tl.constexpr(ROW_LOG_BETA)
ROW_POST_LOGVAR = tl.constexpr(ROW_POST_LOGVAR)
ROW_POST_X0 = tl.constexpr(ROW_POST_X0)
ROW_POST_XT = tl.constexpr(ROW_POST_XT)
ROW_SQRT_1MAB = tl.constexpr(ROW_SQRT_1MAB)
ROW_SQRT_AB = tl.constexpr(ROW_SQRT_AB)
ROW_WEIGHT = tl.constexpr(ROW_WEIGHT)
ROW_X0HAT_OUT = tl.constexpr(ROW_X0HAT_OUT)
ROW_X0HAT_XT = tl.constexpr(ROW_X0HAT_XT)
from .noise import (
    _block_offsets,
    _eps_block,
    cdiv,
    check_common,
    check_t,
    launch_config,
    load_f32,
    next_pow2,
    store_as,
)

LN2 = math.log(2.0)
INV_LN2 = tl.constexpr(1.0 / math.log(2.0))
SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))


@triton.jit
def _tanh(z):
    # libdevice is not available under the interpreter. 1 - 2e/(1+e) rounds once near
    # saturation (where 1 - cdf and the clamp at 1e-12 are decided), like a library tanh.
    e = tl.exp(-2.0 * tl.abs(z))
    th = 1.0 - 2.0 * e / (1.0 + e)
    return tl.where(z < 0, -th, th)


@triton.jit
def _approx_cdf(a):
    """guided-diffusion's tanh approximation of the normal CDF, and its derivative in a."""
    th = _tanh(SQRT_2_OVER_PI * (a + 0.044715 * (a * a * a)))
    cdf = 0.5 * (1.0 + th)
    dcdf = 0.5 * (1.0 - th * th) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * (a * a))
    return cdf, dcdf


@triton.jit
def _nll_and_dls(x, mean, log_scale):
    """-log p(x) of the 256-bin discretized Gaussian and its derivative w.r.t. log_scale
    (gradient of clamp(min=1e-12) taken as torch does: zero below the clamp)."""
    centered = x - mean
    inv_stdv = tl.exp(-log_scale)
    a_p = inv_stdv * (centered + 1.0 / 255.0)
    a_m = inv_stdv * (centered - 1.0 / 255.0)
    cdf_p, pdf_p = _approx_cdf(a_p)
    cdf_m, pdf_m = _approx_cdf(a_m)
    # d a / d log_scale = -a
    dp = -pdf_p * a_p
    dm = -pdf_m * a_m
    one_m = 1.0 - cdf_m
    delta = cdf_p - cdf_m
    lo = x < -0.999
    hi = x > 0.999
    val = tl.where(lo, cdf_p, tl.where(hi, one_m, delta))
    dval = tl.where(lo, dp, tl.where(hi, -dm, dp - dm))
    ok = val >= 1e-12
    valc = tl.maximum(val, 1e-12)
    ll = tl.log(valc)
    dll = tl.where(ok, dval / valc, 0.0)
    return -ll, -dll


@triton.jit(do_not_specialize=["k0", "k1", "inv_batch"])
def _loss_kernel(
    pred_ptr, x0_ptr, t_ptr, tab_ptr, call_ptr, k0, k1,
    grad_ptr, part_ptr, gscale_ptr, inv_batch,
    n, n_chunks, T, n_parts,
    TARGET: tl.constexpr, LEARN_SIGMA: tl.constexpr, CALL_OFFSET: tl.constexpr,
    COMPUTE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, PER_SAMPLE_SCALE: tl.constexpr,
    BLOCK: tl.constexpr, EVEN: tl.constexpr,
):
    NEED_EPS: tl.constexpr = (TARGET != 2) or LEARN_SIGMA
    NEED_X0: tl.constexpr = (TARGET != 0) or LEARN_SIGMA
    pid = tl.program_id(0)
    b = pid // n_chunks
    c = pid % n_chunks
    start, offs, mask = _block_offsets(c, n, BLOCK, EVEN)
    b64 = b.to(tl.int64)
    if LEARN_SIGMA:
        pbase = b64 * n * 2 + start  # not 2 * n: that product is int32 when n is
    else:
        pbase = b64 * n + start
    out = load_f32(pred_ptr + pbase + offs, mask, EVEN)
    if LEARN_SIGMA:
        v = load_f32(pred_ptr + pbase + n + offs, mask, EVEN)
    if NEED_X0:
        x = load_f32(x0_ptr + b64 * n + start + offs, mask, EVEN)
    else:
        x = tl.zeros_like(out)

    t = tl.load(t_ptr + b)
    # t outside [0, T) (not checked on the host on CUDA: that would sync): clamp the table index
    # (no out-of-bounds read) and poison this sample's partial sums and gradient with NaN.
    bad = (t < 0) | (t >= T)
    t = tl.where(bad, 0, t)
    poison = tl.where(bad, float("nan"), 0.0)
    sab = tl.load(tab_ptr + ROW_SQRT_AB * T + t)
    s1mab = tl.load(tab_ptr + ROW_SQRT_1MAB * T + t)
    if NEED_EPS:
        call_u32 = P.as_u32(tl.load(call_ptr) - CALL_OFFSET)
        eps = _eps_block(start, b, call_u32, k0.to(tl.uint32, bitcast=True), k1.to(tl.uint32, bitcast=True), BLOCK)
    else:
        eps = tl.zeros_like(out)

    if TARGET == 0:
        tgt = eps
    elif TARGET == 1:
        tgt = sab * eps - s1mab * x
    else:
        tgt = x
    diff = out - tgt
    if not EVEN:
        diff = tl.where(mask, diff, 0.0)

    if LEARN_SIGMA:
        x_t = sab * x + s1mab * eps
        c_x0 = tl.load(tab_ptr + ROW_POST_X0 * T + t)
        x0_hat = tl.load(tab_ptr + ROW_X0HAT_XT * T + t) * x_t + tl.load(tab_ptr + ROW_X0HAT_OUT * T + t) * out
        mean_model = c_x0 * x0_hat + tl.load(tab_ptr + ROW_POST_XT * T + t) * x_t
        min_log = tl.load(tab_ptr + ROW_POST_LOGVAR * T + t)
        max_log = tl.load(tab_ptr + ROW_LOG_BETA * T + t)
        frac = (v + 1.0) / 2.0
        logvar = frac * max_log + (1.0 - frac) * min_log
        if t == 0:
            vb, dvb_dlv = _nll_and_dls(x, mean_model, 0.5 * logvar)
            dvb_dlv = 0.5 * dvb_dlv
        else:
            d = c_x0 * (x - x0_hat)  # = mean_true - mean_model without float32 cancellation
            e = tl.exp(min_log - logvar)
            q = d * d * tl.exp(-logvar)
            vb = 0.5 * (-1.0 + logvar - min_log + e + q)
            dvb_dlv = 0.5 * (1.0 - e - q)
        if not EVEN:
            vb = tl.where(mask, vb, 0.0)

    if COMPUTE_LOSS:
        tl.store(part_ptr + pid, tl.sum(diff * diff, axis=0) + poison)
        if LEARN_SIGMA:
            tl.store(part_ptr + n_parts + pid, tl.sum(vb, axis=0) + poison)

    if WRITE_GRAD:
        if PER_SAMPLE_SCALE:
            s = tl.load(gscale_ptr + b)
        else:
            s = inv_batch
        s = s + poison
        inv_n = 1.0 / (n * 1.0)  # n may be a constexpr (n == 1 is specialised)
        w = tl.load(tab_ptr + ROW_WEIGHT * T + t)
        g_out = diff * (2.0 * w * inv_n * s)
        store_as(grad_ptr + pbase + offs, g_out, mask, EVEN)
        if LEARN_SIGMA:
            g_v = dvb_dlv * ((max_log - min_log) * 0.5 * inv_n * INV_LN2 * s)
            store_as(grad_ptr + pbase + n + offs, g_v, mask, EVEN)


@triton.jit
def _finalize_body(
    part_ptr, t_ptr, tab_ptr, loss_ptr, terms_ptr, scale_ptr, call_ptr, call_used_ptr,
    B, n_chunks, n_parts, n, T,
    CALL_OFFSET: tl.constexpr, LEARN_SIGMA: tl.constexpr, REDUCE_MEAN: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Fixed-order reduction of the partial sums (deterministic): terms, loss, state.
    While loops with runtime bounds (`for ... in range(B)` does not run under the interpreter
    with NumPy 2.x); the tile shape depends only on powers of two of B and n_chunks."""
    n_f = n * 1.0
    total = tl.sum(tl.zeros([BLOCK_B], tl.float32), axis=0)
    b0 = tl.program_id(0) * 0
    while b0 < B:
        bs = b0 + tl.arange(0, BLOCK_B)
        bm = bs < B
        sse = tl.zeros([BLOCK_B], tl.float32)
        vbs = tl.zeros([BLOCK_B], tl.float32)
        c0 = tl.program_id(0) * 0
        while c0 < n_chunks:
            cs = c0 + tl.arange(0, BLOCK_C)
            m = bm[:, None] & (cs[None, :] < n_chunks)
            idx = bs.to(tl.int64)[:, None] * n_chunks + cs[None, :]
            sse += tl.sum(tl.load(part_ptr + idx, mask=m, other=0.0, cache_modifier=".cg"), axis=1)
            if LEARN_SIGMA:
                vbs += tl.sum(tl.load(part_ptr + n_parts + idx, mask=m, other=0.0, cache_modifier=".cg"), axis=1)
            c0 += BLOCK_C
        t = tl.load(t_ptr + bs, mask=bm, other=0)
        bad = (t < 0) | (t >= T)  # clamped index; the partial sums already carry the NaN
        w = tl.load(tab_ptr + ROW_WEIGHT * T + tl.where(bad, 0, t), mask=bm, other=0.0)
        mse = (sse / n_f) * w
        vb = (vbs / n_f) * INV_LN2
        per = mse + vb
        tl.store(terms_ptr + bs, mse, mask=bm)
        tl.store(terms_ptr + B + bs, vb, mask=bm)
        if REDUCE_MEAN:
            total += tl.sum(tl.where(bm, per, 0.0), axis=0)
        else:
            tl.store(loss_ptr + bs, per, mask=bm)
        b0 += BLOCK_B
    if REDUCE_MEAN:
        tl.store(loss_ptr, total / B)
        tl.store(scale_ptr, 1.0)
    tl.store(call_used_ptr, tl.load(call_ptr) - CALL_OFFSET)


@triton.jit
def _finalize_kernel(
    part_ptr, t_ptr, tab_ptr, loss_ptr, terms_ptr, scale_ptr, call_ptr, call_used_ptr,
    B, n_chunks, n_parts, n, T,
    CALL_OFFSET: tl.constexpr, LEARN_SIGMA: tl.constexpr, REDUCE_MEAN: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    _finalize_body(part_ptr, t_ptr, tab_ptr, loss_ptr, terms_ptr, scale_ptr, call_ptr, call_used_ptr,
                   B, n_chunks, n_parts, n, T, CALL_OFFSET, LEARN_SIGMA, REDUCE_MEAN, BLOCK_B, BLOCK_C)


@triton.jit
def _scale_grad_kernel(grad_ptr, state_ptr, g_ptr, N, PARITY: tl.constexpr, BLOCK: tl.constexpr):
    """grad *= g / state[PARITY], skipped (no memory traffic) when g equals the scale already
    applied; program 0 records g in state[1 - PARITY] for the next backward through the same
    graph. Reads and the write go to different slots, so one launch has no race. A small grid
    strides over the blocks: the usual no-op case then costs a launch of a few hundred programs."""
    g = tl.load(g_ptr).to(tl.float32)
    s = tl.load(state_ptr + PARITY)
    if g != s:
        f = g / s
        blk = tl.program_id(0).to(tl.int64)
        while blk * BLOCK < N:
            offs = blk * BLOCK + tl.arange(0, BLOCK)
            m = offs < N
            x = tl.load(grad_ptr + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(grad_ptr + offs, (x * f).to(grad_ptr.dtype.element_ty), mask=m)
            blk += tl.num_programs(0)
    tl.store(state_ptr + (1 - PARITY), g, mask=tl.program_id(0) == 0)


def check_loss_inputs(pred, x0, t, tables, call, learn_sigma: bool, target: int) -> None:
    check_common(x0, tables, call)
    if not isinstance(pred, torch.Tensor):
        raise TypeError(f"pred must be a tensor, got {type(pred).__name__}")
    if pred.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"pred dtype {pred.dtype} is not supported by the triton backend (float32, float16, bfloat16)")
    if pred.device != x0.device:
        raise ValueError(f"pred is on {pred.device}, x0 on {x0.device}")
    if learn_sigma:
        if x0.dim() < 2:
            raise ValueError(f"learned sigma needs a channel dimension; x0 has shape {tuple(x0.shape)}")
        want = (x0.shape[0], 2 * x0.shape[1], *x0.shape[2:])
    else:
        want = tuple(x0.shape)
    if tuple(pred.shape) != tuple(want):
        raise ValueError(
            f"pred has shape {tuple(pred.shape)}, expected {tuple(want)}"
            + (" (2C channels: output and variance)" if learn_sigma else " (the shape of x0)")
        )
    check_t(t, x0.shape[0], x0.device)
    if target not in (0, 1, 2):
        raise ValueError(f"target must be 0 (eps), 1 (v) or 2 (x0), got {target!r}")


def _finalize_blocks(batch: int, n_chunks: int, tile: int = 4096) -> dict:
    """Tile of the fixed-order reduction (one program): a big tile, since at 64x3x256x256 a
    512-element tile made it ~10 us of serial loop (H100)."""
    block_c = min(tile // 4, next_pow2(n_chunks))
    block_b = max(1, min(tile // block_c, next_pow2(batch)))
    return dict(BLOCK_B=block_b, BLOCK_C=block_c)


def loss_forward(pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean, packed=False, need_grad=True):
    """Forward: (loss, terms [2, B], grad (or empty), scale state [2], call index used [1]).

    Two launches: the loss kernel and the one-program finalize. `packed` (eager path) carves the small float32 outputs and the partial sums out of
    one allocation; the registered op keeps them separate (outputs of an op must not alias)."""
    pred = pred.contiguous()
    x0 = x0.contiguous()
    t = t.contiguous()
    tables = tables.contiguous()
    batch = x0.shape[0]
    n = x0.numel() // batch
    block, warps, n_chunks, even = launch_config(n, x0.numel())
    n_parts = batch * n_chunks
    n_terms = 2 if learn_sigma else 1
    dev = x0.device
    f32 = dict(dtype=torch.float32, device=dev)
    n_loss = 1 if reduce_mean else batch
    if packed:
        aux = torch.empty(n_terms * n_parts + 2 * batch + n_loss + 2, **f32)
        part = aux[: n_terms * n_parts]
        o = n_terms * n_parts
        terms = aux[o : o + 2 * batch].view(2, batch)
        o += 2 * batch
        loss = aux[o] if reduce_mean else aux[o : o + batch]
        scale = aux[o + n_loss : o + n_loss + 2]
    else:
        part = torch.empty(n_terms * n_parts, **f32)
        terms = torch.empty(2, batch, **f32)
        loss = torch.empty((), **f32) if reduce_mean else torch.empty(batch, **f32)
        scale = torch.empty(2, **f32)  # two slots: see _scale_grad_kernel
    call_used = torch.empty(1, dtype=torch.int64, device=dev)
    write_grad = bool(reduce_mean) and need_grad  # no gradient pass for evaluation (no_grad)
    grad = torch.empty_like(pred) if write_grad else pred.new_empty(0)
    _loss_kernel[(n_parts,)](
        pred, x0, t, tables, call, P.split_key(k0), P.split_key(k1),
        grad, part, t, 1.0 / batch,
        n, n_chunks, tables.shape[1], n_parts,
        TARGET=int(target), LEARN_SIGMA=bool(learn_sigma), CALL_OFFSET=1,
        COMPUTE_LOSS=True, WRITE_GRAD=write_grad, PER_SAMPLE_SCALE=False,
        BLOCK=block, EVEN=even, num_warps=warps,
    )
    _finalize_kernel[(1,)](
        part, t, tables, loss, terms, scale, call, call_used,
        batch, n_chunks, n_parts, n, tables.shape[1],
        CALL_OFFSET=1, LEARN_SIGMA=bool(learn_sigma), REDUCE_MEAN=bool(reduce_mean),
        **_finalize_blocks(batch, n_chunks), num_warps=8,
    )
    return loss, terms, grad, scale, call_used


def loss_grad(pred, x0, t, tables, k0, k1, call_used, target, learn_sigma, grad_output):
    """d(sum_b g[b] * loss_b)/d pred for per-sample grad_output g (reduction 'none' backward)."""
    pred = pred.contiguous()
    x0 = x0.contiguous()
    t = t.contiguous()
    tables = tables.contiguous()
    g = grad_output.to(torch.float32).contiguous()  # an expanded (stride-0) g is made dense
    grad = torch.empty_like(pred)
    batch = x0.shape[0]
    n = x0.numel() // batch
    block, warps, n_chunks, even = launch_config(n, x0.numel())
    _loss_kernel[(batch * n_chunks,)](
        pred, x0, t, tables, call_used, P.split_key(k0), P.split_key(k1),
        grad, g, g, 1.0,
        n, n_chunks, tables.shape[1], batch * n_chunks,
        TARGET=int(target), LEARN_SIGMA=bool(learn_sigma), CALL_OFFSET=0,
        COMPUTE_LOSS=False, WRITE_GRAD=True, PER_SAMPLE_SCALE=True,
        BLOCK=block, EVEN=even, num_warps=warps,
    )
    return grad


_SCALE_GRID = 512  # programs: ~4 per SM on an H100/H200, enough to stream the rare real rescale


def scale_grad_(grad, state, grad_output, parity: int):
    """In place, one launch: grad *= grad_output / state[parity]; state[1 - parity] = grad_output.
    `parity` is the host-side count of backward calls through this graph node, mod 2."""
    N = grad.numel()
    BLOCK = 4096
    g = grad_output.reshape(1)
    grid = max(1, min(cdiv(N, BLOCK), _SCALE_GRID))
    _scale_grad_kernel[(grid,)](grad, state, g, N, PARITY=parity, BLOCK=BLOCK, num_warps=8)
    return grad
