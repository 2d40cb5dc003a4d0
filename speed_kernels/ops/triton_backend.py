"""The `triton` backend: the Triton overloads of the ops of speed_kernels.op_schema, and the
backend object.

``torch.ops.speed_kernels.{noise, loss, loss_backward}.triton`` (schema, fake kernel and autograd
formula from op_schema) are opaque nodes for torch.compile (fullgraph=True works, no graph break).
Eager calls skip the dispatcher (about 3x its host cost) and launch the same kernels directly, with
a plain autograd.Function for the loss. Both paths are valid under CUDA-graph capture: the call counter
is a device tensor the noise op mutates (declared in `mutates_args`), so every replay of a
captured step draws fresh t and eps.

Inputs are made contiguous (one copy for a non-contiguous input); outputs are contiguous.
Supported dtypes: float32, float16, bfloat16 (arithmetic in float32); float64 -> TypeError
(use backend="torch"). Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .. import _ext  # noqa: F401  (defines the ops' default overloads first, where built)
from .. import op_schema
from ..tables import ROW_SQRT_AB
from . import loss as _loss
from . import noise as _noise

# ---------------------------------------------------------------------------------------------
# the Triton overloads of the ops of speed_kernels.op_schema (what torch.compile traces)


def _loss_impl(pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean, with_grad):
    if with_grad and not reduce_mean:
        raise ValueError("speed_kernels::loss: with_grad needs reduce_mean (reduction none recomputes the "
                         "gradient in loss_backward)")
    loss, terms, grad, _scale, _call_used = _loss.loss_forward(
        pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean, need_grad=with_grad
    )
    return loss, terms, grad


def _loss_backward_impl(grad_loss, pred, x0, t, tables, k0, k1, call, target, learn_sigma):
    return _loss.loss_grad(pred, x0, t, tables, k0, k1, call - 1, target, learn_sigma, grad_loss)


op_schema.define_overload("noise", "triton", _noise.noise_launch)
op_schema.define_overload("loss", "triton", _loss_impl)
op_schema.define_overload("loss_backward", "triton", _loss_backward_impl)
op_schema.register_autograd("speed_kernels::loss.triton", op_schema.loss_autograd("triton"))
_NOISE_OP = torch.ops.speed_kernels.noise.triton
_LOSS_OP = torch.ops.speed_kernels.loss.triton

# ---------------------------------------------------------------------------------------------
# the eager path: the same kernels launched directly (no dispatcher), gradient scaled in place


def _grad_pred(ctx, g_loss):
    if g_loss is None:
        return None
    if ctx.reduce_mean:
        # Scale in place on the device, skipped when grad_output equals the scale already applied
        # (CUDA-graph safe: no host read); the buffer is then autograd's gradient.
        grad, scale = ctx.saved_tensors
        parity = ctx.n_backward % 2
        ctx.n_backward += 1
        return _loss.scale_grad_(grad, scale, g_loss, parity)
    pred, x0, t, tables, call_used = ctx.saved_tensors
    k0, k1, target, learn_sigma = ctx.args
    return _loss.loss_grad(pred, x0, t, tables, k0, k1, call_used, target, learn_sigma, g_loss)


class _EagerLoss(torch.autograd.Function):
    """The eager path: the same kernels without the custom-op dispatch (~3x less host overhead
    per call, which is most of the cost of a loss path at DiT-latent sizes)."""

    @staticmethod
    def forward(ctx, pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean):
        loss, terms, grad, scale, call_used = _loss.loss_forward(
            pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean, packed=True
        )
        ctx.reduce_mean = reduce_mean
        ctx.n_backward = 0
        if reduce_mean:
            ctx.save_for_backward(grad, scale)
        else:  # the counter snapshot the kernel wrote: a later noise call may advance `call`
            ctx.save_for_backward(pred, x0, t, tables, call_used)
            ctx.args = (k0, k1, target, learn_sigma)
        ctx.mark_non_differentiable(terms)
        # No zero-filled gradient for the `terms` output: one kernel fewer per backward
        ctx.set_materialize_grads(False)
        return loss, terms

    @staticmethod
    def backward(ctx, g_loss, g_terms):
        return (_grad_pred(ctx, g_loss),) + (None,) * 9


# ---------------------------------------------------------------------------------------------
# backend object


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend:
    """Fused Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""

    name = "triton"

    def supports(self, device: torch.device) -> bool:
        device = torch.device(device)
        return device.type == "cuda" or (device.type == "cpu" and _interpreted())

    def _check_device(self, x: Tensor) -> None:
        if not self.supports(x.device):
            raise ValueError(
                f"the triton backend runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1); got {x.device}"
            )

    def noise(self, x0, t_in, a):
        _noise.check_common(x0, a.tables, a.call)
        self._check_device(x0)
        if t_in is not None:
            _noise.check_t(t_in, x0.shape[0], x0.device, "t_in")
        args = (x0.detach(), t_in, a.tables, int(a.k0), int(a.k1), a.call, bool(a.mirror), int(a.pivot))
        if torch.compiler.is_compiling():
            x_t, t = _NOISE_OP(*args)
        else:  # eager / CUDA-graph capture: launch directly (no custom-op dispatch overhead)
            x_t, t = _noise.noise_launch(*args)
        if x0.requires_grad and torch.is_grad_enabled():
            # A mutating op cannot carry an autograd formula; x0 is data in training, so the
            # rare differentiable case adds sqrt(ab_t) * (x0 - x0.detach()) (value 0, grad right).
            coef = a.tables[ROW_SQRT_AB][t].view(-1, *([1] * (x0.dim() - 1)))
            x_t = x_t + (coef * (x0 - x0.detach()).float()).to(x_t.dtype)
        return x_t, t

    def loss(self, pred, x0, t, a, reduce_mean):
        _loss.check_loss_inputs(pred, x0, t, a.tables, a.call, bool(a.learn_sigma), a.target)
        self._check_device(x0)
        args = (pred, x0, t, a.tables, int(a.k0), int(a.k1), a.call, int(a.target), bool(a.learn_sigma),
                bool(reduce_mean))
        with_grad = bool(pred.requires_grad and torch.is_grad_enabled())
        if torch.compiler.is_compiling():
            loss, terms, _grad = _LOSS_OP(*args, with_grad and bool(reduce_mean))
            return loss, terms
        if not with_grad:  # evaluation: no gradient pass
            loss, terms, *_ = _loss.loss_forward(*args, packed=True, need_grad=False)
            return loss, terms
        return _EagerLoss.apply(*args)

    def __repr__(self) -> str:
        return "TritonBackend(interpreted)" if _interpreted() else "TritonBackend()"
