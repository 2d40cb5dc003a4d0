"""Noise op: draw t (inverse CDF of the strategy's table, optional SpeeD mirror, or a given t),
draw eps from Philox (never stored), write x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps and t.
A given t outside [0, T) is not checked here (no host sync on CUDA): its table index is clamped
(no out-of-bounds read) and its x_t is NaN, as in the cuda backend.

One launch, flat grid over (sample, chunk): program p handles elements
[c*BLOCK, (c+1)*BLOCK) of sample b = p // n_chunks. Every program of a sample recomputes its t
(one Philox call and a ~10-step search of a table that sits in L1/L2): cheaper than a second
launch or a grid-wide dependency. The call counter is read from the device tensor `call` inside
the kernel and advanced by `call.add_(1)` after the launch (stream-ordered), so nothing syncs
with the host and a captured CUDA graph draws fresh numbers on every replay.
(An opt-in variant that advanced the counter and reduced the loss inside the kernels through
last-program tickets measured no faster on an H100 -- 26.2 against 25.7 us at 256x4x32x32 -- and
was removed: one path, no knob.)
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..tables import NUM_ROWS, ROW_CDF, ROW_SQRT_1MAB, ROW_SQRT_AB
from . import philox as P

# Kernels may read module globals only when they are tl.constexpr objects (the interpreter is
# laxer than the compiler): rebind the row indices used inside @triton.jit functions.
ROW_CDF = tl.constexpr(ROW_CDF)
ROW_SQRT_AB = tl.constexpr(ROW_SQRT_AB)
ROW_SQRT_1MAB = tl.constexpr(ROW_SQRT_1MAB)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints. Plain Python: triton.cdiv / next_power_of_2 are JIT functions whose
    host-side call costs ~5 us each, several times per step on the eager path."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


SMALL_BATCH = 1 << 22  # elements in the batch below which the small-batch tile is used


def block_config(n: int, total: int) -> tuple[int, int]:
    """(BLOCK elements per program, num_warps) for n elements per sample and `total` in the
    batch. From the sweep in benchmarks/bench_ops.py (H100, CUDA-graph replay, fp32):
    at 64x3x256x256 4096 with 8 warps (16 per thread, four Philox groups) was the fastest of
    512..4096 x 4/8 warps (90.0 us against 91.4 for 2048/4 and 96.5 for 1024/4; learned sigma
    141 against 143 and 150); at 256x4x32x32 1024 with 4 warps was among the fastest (24.7 us
    against 25.8 for 4096/8): a small batch wants more programs in flight. The learned-sigma
    loss needs no smaller tile (128 registers at 16 per thread, no spills).
    SPEED_TRITON_BLOCK / SPEED_TRITON_WARPS override them."""
    default = 1024 if 0 < total < SMALL_BATCH else 4096
    cap = int(os.environ.get("SPEED_TRITON_BLOCK", str(default)))
    block = max(64, min(cap, next_pow2(max(n, 1))))
    warps = int(os.environ.get("SPEED_TRITON_WARPS", "0")) or (8 if block >= 4096 else 4)
    return block, warps


def launch_config(n: int, total: int) -> tuple[int, int, int, bool]:
    """(BLOCK, num_warps, chunks per sample, EVEN) of the noise and loss kernels. n == 0 still
    gets one chunk (one program per sample draws its t); EVEN means BLOCK divides n."""
    block, warps = block_config(n, total)
    return block, warps, max(1, cdiv(n, block)), n > 0 and n % block == 0


@triton.jit
def _eps_block(start, b, call_u32, key0, key1, BLOCK: tl.constexpr):
    """eps of elements [start, start + BLOCK) of sample b (start a multiple of 4, int64): one
    Philox call per group of 4, the four lanes interleaved in registers (join + reshape keeps
    each thread's 4 consecutive values together, matching a 16-byte load)."""
    G: tl.constexpr = BLOCK // 4
    grp = P.as_u32(start // 4) + tl.arange(0, G).to(tl.uint32)
    n0, n1, n2, n3 = P.normal4(grp, b, call_u32, key0, key1)
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [BLOCK])


@triton.jit
def _block_offsets(c, n, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    """(start, int32 offsets, mask) of chunk c of a sample of n elements. Per-element index math
    stays 32-bit (the 64-bit part is the scalar start); EVEN (n % BLOCK == 0) drops the mask."""
    start = c.to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    mask = offs < tl.minimum(n - start, BLOCK).to(tl.int32)  # unused (and dropped) when EVEN
    return start, offs, mask


@triton.jit
def load_f32(ptrs, mask, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(ptrs).to(tl.float32)
    else:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_as(ptrs, val, mask, EVEN: tl.constexpr):
    if EVEN:
        tl.store(ptrs, val.to(ptrs.dtype.element_ty))
    else:
        tl.store(ptrs, val.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["k0", "k1", "pivot", "n_draw"])
def _noise_kernel(
    x0_ptr, xt_ptr, t_out_ptr, t_in_ptr, tab_ptr, call_ptr,
    k0, k1, pivot, n_draw, n, n_chunks, T,
    HAS_T: tl.constexpr, MIRROR: tl.constexpr, NITER: tl.constexpr, BLOCK: tl.constexpr,
    EVEN: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // n_chunks
    c = pid % n_chunks
    start, offs, mask = _block_offsets(c, n, BLOCK, EVEN)
    # 64-bit scalar base (the batch may hold more than 2^31 elements), 32-bit offsets.
    base = b.to(tl.int64) * n + start
    # Issue the x0 load first: its latency overlaps the Philox rounds and the t search.
    x = load_f32(x0_ptr + base + offs, mask, EVEN)

    key0 = k0.to(tl.uint32, bitcast=True)
    key1 = k1.to(tl.uint32, bitcast=True)
    call = tl.load(call_ptr)
    call_u32 = P.as_u32(call)
    eps = _eps_block(start, b, call_u32, key0, key1, BLOCK)

    bad = False
    if HAS_T:
        # A given t outside [0, T) (not checked on the host on CUDA: that would sync): clamp the
        # table index (never an out-of-bounds read) and make this sample's x_t NaN.
        t = tl.load(t_in_ptr + b)
        bad = (t < 0) | (t >= T)
        t = tl.where(bad, 0, t)
    else:
        if MIRROR:
            src = tl.where(b < n_draw, b, b - n_draw)
        else:
            src = b
        u = P.timestep_uniform(src, call_u32, key0, key1)
        t = P.inverse_cdf(tab_ptr + ROW_CDF * T, u, T, NITER).to(tl.int64)
        if MIRROR:
            t = tl.where(b < n_draw, t, tl.abs(t - pivot))
    sab = tl.load(tab_ptr + ROW_SQRT_AB * T + t)
    s1mab = tl.load(tab_ptr + ROW_SQRT_1MAB * T + t)
    if HAS_T:
        sab = tl.where(bad, float("nan"), sab)
    xt = sab * x + s1mab * eps
    store_as(xt_ptr + base + offs, xt, mask, EVEN)
    if HAS_T:
        t = tl.load(t_in_ptr + b)  # the given value, out of range or not (as the cuda backend)
    tl.store(t_out_ptr + b, t, mask=c == 0)


def check_common(x0: torch.Tensor, tables: torch.Tensor, call: torch.Tensor, name: str = "x0") -> None:
    """Host-side metadata checks shared by both ops (no device sync)."""
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x0).__name__}")
    if x0.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} dtype {x0.dtype} is not supported by the triton backend "
            "(float32, float16, bfloat16; use backend='torch' for float64)"
        )
    if x0.dim() < 1 or x0.shape[0] == 0:
        raise ValueError(f"{name} must have a non-empty batch dimension, got shape {tuple(x0.shape)}")
    if tables.dim() != 2 or tables.shape[0] != NUM_ROWS or tables.dtype != torch.float32:
        raise ValueError(
            f"tables must be float32 [{NUM_ROWS}, T], got {tables.dtype} {tuple(tables.shape)}"
        )
    if tables.device != x0.device:
        raise ValueError(f"tables are on {tables.device}, {name} on {x0.device}")
    if call.dtype != torch.int64 or call.numel() != 1:
        raise ValueError(f"call must be an int64 tensor with one element, got {call.dtype} {tuple(call.shape)}")
    if call.device != x0.device:
        raise ValueError(f"call counter is on {call.device}, {name} on {x0.device}")


def check_t(t: torch.Tensor, batch: int, device, name: str = "t") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != torch.int64 or t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must be int64 [{batch}], got {t.dtype} {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, x0 on {device}")


def noise_launch(x0, t_in, tables, k0, k1, call, mirror, pivot):
    """Launch the noise kernel; returns (x_t, t) and advances `call` (device-side add)."""
    x0c = x0.contiguous()  # non-contiguous input: one copy here, documented
    tab = tables.contiguous()
    batch = x0c.shape[0]
    n = x0c.numel() // batch
    T = tab.shape[1]
    x_t = torch.empty_like(x0c)
    t = torch.empty(batch, dtype=torch.int64, device=x0c.device)
    block, warps, n_chunks, even = launch_config(n, x0c.numel())
    n_draw = batch // 2 + 1 if mirror else batch
    _noise_kernel[(batch * n_chunks,)](
        x0c, x_t, t, t_in if t_in is not None else t, tab, call,
        P.split_key(k0), P.split_key(k1), int(pivot), n_draw, n, n_chunks, T,
        HAS_T=t_in is not None, MIRROR=bool(mirror) and t_in is None,
        NITER=T.bit_length(), BLOCK=block, EVEN=even, num_warps=warps,
    )
    call.add_(1)  # stream-ordered after the launch: every program has read the counter
    return x_t, t
