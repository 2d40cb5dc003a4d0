"""Flow-matching loss op in Triton: regenerate eps of the last noise call, per-sample weighted MSE
and d(sum of per-sample losses)/d pred in one pass.

Kernel grid as ops/noise.py (sample, chunk). Each program loads pred, x0 when the target needs it
(v: eps - x0, x0), regenerates eps from the Philox counters when needed (v, eps), writes the
partial sum of (pred - target)^2 and, when a gradient is wanted, 2 w[b] (pred - target) / n.
The per-sample weight w (a [B] vector: the table interpolation and the optional sigma^-2,
reference.flow_weight) and the partial-sum reduction are tiny torch ops on the device: no host
sync. Backward multiplies the saved per-sample gradient by grad_output[b] (one pass; the DDPM
loss folds that pass into the forward for the mean reduction, this op keeps one code path for
both reductions). Registered as torch.ops.speed_kernels.flow_loss.triton (schema, fake and
autograd formula from speed_kernels.op_schema), so torch.compile(fullgraph=True) sees one opaque node.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _ext  # noqa: F401  (defines the ops' default overloads first, where built)
from .. import op_schema
from ..reference import flow_weight
from . import philox as P
from .flow_noise import check_flow_common
from .noise import _block_offsets, _eps_block, launch_config, load_f32, store_as


@triton.jit(do_not_specialize=["k0", "k1"])
def _flow_loss_kernel(
    pred_ptr, x0_ptr, w_ptr, call_ptr, k0, k1, grad_ptr, part_ptr, n, n_chunks,
    TARGET: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr,
):
    NEED_EPS: tl.constexpr = TARGET != 2
    NEED_X0: tl.constexpr = TARGET != 0
    pid = tl.program_id(0)
    b = pid // n_chunks
    c = pid % n_chunks
    start, offs, mask = _block_offsets(c, n, BLOCK, EVEN)
    base = b.to(tl.int64) * n + start
    out = load_f32(pred_ptr + base + offs, mask, EVEN)
    if NEED_X0:
        x = load_f32(x0_ptr + base + offs, mask, EVEN)
    else:
        x = tl.zeros_like(out)
    if NEED_EPS:
        call_u32 = P.as_u32(tl.load(call_ptr))  # the call index the eps came from
        eps = _eps_block(start, b, call_u32, k0.to(tl.uint32, bitcast=True), k1.to(tl.uint32, bitcast=True), BLOCK)
    else:
        eps = tl.zeros_like(out)
    if TARGET == 0:
        tgt = eps
    elif TARGET == 1:
        tgt = eps - x
    else:
        tgt = x
    diff = out - tgt
    if not EVEN:
        diff = tl.where(mask, diff, 0.0)
    tl.store(part_ptr + pid, tl.sum(diff * diff, axis=0))
    if WRITE_GRAD:
        w = tl.load(w_ptr + b)
        inv_n = 1.0 / (n * 1.0)
        store_as(grad_ptr + base + offs, diff * (2.0 * w * inv_n), mask, EVEN)


def flow_loss_launch(pred, x0, w, call_used, k0, k1, target, need_grad):
    """(per-sample weighted MSE float32 [B], d sum(per) / d pred or an empty tensor)."""
    pred = pred.contiguous()
    x0 = x0.contiguous()
    batch = x0.shape[0]
    n = x0.numel() // batch
    block, warps, n_chunks, even = launch_config(n, x0.numel())
    part = torch.empty(batch * n_chunks, dtype=torch.float32, device=x0.device)
    grad = torch.empty_like(pred) if need_grad else pred.new_empty(0)
    wc = w.to(torch.float32).contiguous()
    _flow_loss_kernel[(batch * n_chunks,)](
        pred, x0, wc, call_used, P.split_key(k0), P.split_key(k1), grad if need_grad else part, part, n, n_chunks,
        TARGET=int(target), WRITE_GRAD=bool(need_grad), BLOCK=block, EVEN=even, num_warps=warps,
    )
    per = part.view(batch, n_chunks).sum(dim=1) * (1.0 / n) * wc
    return per, grad


def _flow_loss_impl(pred, x0, sigma, tables, k0, k1, call_used, target, inv_sigma2, with_grad):
    w = flow_weight(sigma.to(torch.float32), tables, bool(inv_sigma2))
    return flow_loss_launch(pred, x0, w, call_used, k0, k1, target, with_grad)


op_schema.define_overload("flow_loss", "triton", _flow_loss_impl)
op_schema.register_autograd("speed_kernels::flow_loss.triton", op_schema.FLOW_LOSS_AUTOGRAD)
_FLOW_LOSS_OP = torch.ops.speed_kernels.flow_loss.triton


def check_flow_loss_inputs(pred, x0, sigma, tables, call, target) -> None:
    check_flow_common(x0, tables, call)
    if not isinstance(pred, torch.Tensor) or pred.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError("pred must be a float32, float16 or bfloat16 tensor for the triton backend")
    if pred.shape != x0.shape or pred.device != x0.device:
        raise ValueError(f"pred must match x0 in shape and device, got {tuple(pred.shape)} on {pred.device}")
    if not isinstance(sigma, torch.Tensor) or sigma.shape != (x0.shape[0],) or sigma.device != x0.device:
        raise ValueError(f"sigma must be a [{x0.shape[0]}] tensor on {x0.device}")
    if target not in (0, 1, 2):
        raise ValueError(f"target must be 0 (eps), 1 (v) or 2 (x0), got {target!r}")


def flow_loss(pred, x0, sigma, a, reduce_mean):
    """(loss, terms): batch mean or per-sample [B] loss, and the detached per-sample [B]."""
    check_flow_loss_inputs(pred, x0, sigma, a.tables, a.call, a.target)
    call_used = a.call - 1  # a snapshot: a later noise call may advance `call` before backward
    with_grad = bool(pred.requires_grad and torch.is_grad_enabled())
    per, _grad = _FLOW_LOSS_OP(pred, x0.detach(), sigma, a.tables, int(a.k0), int(a.k1), call_used, int(a.target),
                               bool(a.inv_sigma2), with_grad)
    return (per.mean() if reduce_mean else per), per.detach()
