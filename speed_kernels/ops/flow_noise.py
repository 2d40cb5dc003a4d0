"""Flow-matching noise op in Triton: draw sigma (inverse CDF of the flow table) and eps (Philox,
never stored), write x_t = (1 - sigma) x0 + sigma eps and sigma.

Same flat (sample, chunk) grid and RNG contract as ops/noise.py. sigma's uniform is word 0 of
philox(0, sample, call, stream 2); sigma = q[j] + f * dq[j] with pos = u * N, j = floor(pos),
f = pos - j: f * dq[j] is exact in float32 (12 + 12 significant bits), so a fused multiply-add
and a separate multiply and add round to the same float and sigma equals the reference's bit
for bit. The counter is advanced by a stream-ordered `call.add_(1)` after the launch (no host
sync; CUDA-graph safe). Registered as torch.ops.speed_kernels.flow_noise.triton (schema and fake
from speed_kernels.op_schema) for torch.compile(fullgraph=True).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _ext  # noqa: F401  (defines the ops' default overloads first, where built)
from .. import op_schema
from ..reference import FLOW_NUM_ROWS, FLOW_ROW_DQ, FLOW_ROW_Q, FLOW_STREAM_SIGMA
from . import philox as P
from .noise import FLOAT_DTYPES, _block_offsets, _eps_block, launch_config, load_f32, store_as

ROW_Q = tl.constexpr(FLOW_ROW_Q)
ROW_DQ = tl.constexpr(FLOW_ROW_DQ)
STREAM_SIGMA = tl.constexpr(FLOW_STREAM_SIGMA)


@triton.jit
def draw_sigma(b, call_u32, key0, key1, tab_ptr, NQ):
    """sigma of sample b: the uniform of stream 2, then the exact-slope table interpolation."""
    zero = tl.zeros_like(call_u32)
    w0, _w1, _w2, _w3 = P.philox4x32_10(zero, P.as_u32(b), call_u32, zero + STREAM_SIGMA, key0, key1)
    u = P.bits_to_uniform(w0)
    pos = u * NQ.to(tl.float32)
    j = tl.minimum(pos.to(tl.int32), NQ - 1)  # pos >= 0: truncation is floor
    f = pos - j.to(tl.float32)
    q = tl.load(tab_ptr + ROW_Q * (NQ + 1) + j)
    dq = tl.load(tab_ptr + ROW_DQ * (NQ + 1) + j)
    return q + f * dq


@triton.jit(do_not_specialize=["k0", "k1"])
def _flow_noise_kernel(
    x0_ptr, xt_ptr, sigma_out_ptr, sigma_in_ptr, tab_ptr, call_ptr,
    k0, k1, n, n_chunks, NQ,
    HAS_SIGMA: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // n_chunks
    c = pid % n_chunks
    start, offs, mask = _block_offsets(c, n, BLOCK, EVEN)
    base = b.to(tl.int64) * n + start
    x = load_f32(x0_ptr + base + offs, mask, EVEN)
    key0 = k0.to(tl.uint32, bitcast=True)
    key1 = k1.to(tl.uint32, bitcast=True)
    call_u32 = P.as_u32(tl.load(call_ptr))
    eps = _eps_block(start, b, call_u32, key0, key1, BLOCK)
    if HAS_SIGMA:
        sigma = tl.load(sigma_in_ptr + b)
    else:
        sigma = draw_sigma(b, call_u32, key0, key1, tab_ptr, NQ)
    xt = (1.0 - sigma) * x + sigma * eps
    store_as(xt_ptr + base + offs, xt, mask, EVEN)
    tl.store(sigma_out_ptr + b, sigma, mask=c == 0)


def check_flow_common(x0: torch.Tensor, tables: torch.Tensor, call: torch.Tensor) -> None:
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"x0 must be a tensor, got {type(x0).__name__}")
    if x0.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x0 dtype {x0.dtype} is not supported by the triton backend (float32, float16, "
                        "bfloat16; use backend='torch' for float64)")
    if x0.dim() < 1 or x0.shape[0] == 0:
        raise ValueError(f"x0 must have a non-empty batch dimension, got shape {tuple(x0.shape)}")
    if tables.dim() != 2 or tables.shape[0] != FLOW_NUM_ROWS or tables.dtype != torch.float32:
        raise ValueError(f"tables must be float32 [{FLOW_NUM_ROWS}, N + 1], got {tables.dtype} {tuple(tables.shape)}")
    if tables.device != x0.device or call.device != x0.device:
        raise ValueError(f"tables ({tables.device}) and call ({call.device}) must be on x0's device {x0.device}")
    if call.dtype != torch.int64 or call.numel() != 1:
        raise ValueError(f"call must be an int64 tensor with one element, got {call.dtype} {tuple(call.shape)}")


def flow_noise_launch(x0, sigma_in, tables, k0, k1, call):
    x0c = x0.contiguous()
    tab = tables.contiguous()
    batch = x0c.shape[0]
    n = x0c.numel() // batch
    x_t = torch.empty_like(x0c)
    sigma = torch.empty(batch, dtype=torch.float32, device=x0c.device)
    sig_in = sigma_in.to(torch.float32).contiguous() if sigma_in is not None else sigma
    block, warps, n_chunks, even = launch_config(n, x0c.numel())
    _flow_noise_kernel[(batch * n_chunks,)](
        x0c, x_t, sigma, sig_in, tab, call, P.split_key(k0), P.split_key(k1), n, n_chunks, tab.shape[1] - 1,
        HAS_SIGMA=sigma_in is not None, BLOCK=block, EVEN=even, num_warps=warps,
    )
    call.add_(1)
    return x_t, sigma


op_schema.define_overload("flow_noise", "triton", flow_noise_launch)
_FLOW_NOISE_OP = torch.ops.speed_kernels.flow_noise.triton


def flow_noise(x0, sigma_in, a):
    """(x_t in x0's dtype, sigma float32 [B]); advances `a.call`. x0 is data (no gradient)."""
    check_flow_common(x0, a.tables, a.call)
    if sigma_in is not None and (sigma_in.shape != (x0.shape[0],) or sigma_in.device != x0.device):
        raise ValueError(f"sigma must be a [{x0.shape[0]}] tensor on {x0.device}")
    args = (x0.detach(), sigma_in, a.tables, int(a.k0), int(a.k1), a.call)
    if torch.compiler.is_compiling():
        return _FLOW_NOISE_OP(*args)
    return flow_noise_launch(*args)
