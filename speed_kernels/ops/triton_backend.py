"""The `triton` backend: the fused ops registered with torch.library, and the backend object.

Registration (`torch.library.custom_op` + `register_fake` + `register_autograd`) makes the ops
opaque nodes for torch.compile (fullgraph=True works, no graph break). Eager calls skip the
custom-op dispatcher (about 3x its host cost) and launch the same kernels directly, with a plain
autograd.Function for the loss. Both paths are valid under CUDA-graph capture: the call counter
is a device tensor the noise op mutates (declared in `mutates_args`), so every replay of a
captured step draws fresh t and eps.

Inputs are made contiguous (one copy for a non-contiguous input); outputs are contiguous.
Supported dtypes: float32, float16, bfloat16 (arithmetic in float32); float64 -> TypeError
(use backend="torch"). Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ..tables import ROW_SQRT_AB
from . import loss as _loss
from . import noise as _noise

# ---------------------------------------------------------------------------------------------
# noise op


@torch.library.custom_op("speed_triton::noise", mutates_args=("call",))
def triton_noise(
    x0: Tensor, t_in: Optional[Tensor], tables: Tensor, k0: int, k1: int, call: Tensor, mirror: bool, pivot: int
) -> tuple[Tensor, Tensor]:
    return _noise.noise_launch(x0, t_in, tables, k0, k1, call, mirror, pivot)


@triton_noise.register_fake
def _noise_fake(x0, t_in, tables, k0, k1, call, mirror, pivot):
    return torch.empty(x0.shape, dtype=x0.dtype, device=x0.device), x0.new_empty(x0.shape[0], dtype=torch.int64)



# ---------------------------------------------------------------------------------------------
# loss op


@torch.library.custom_op("speed_triton::loss", mutates_args=())
def triton_loss(
    pred: Tensor, x0: Tensor, t: Tensor, tables: Tensor, k0: int, k1: int, call: Tensor,
    target: int, learn_sigma: bool, reduce_mean: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, terms [2,B], grad of the mean loss w.r.t. pred (empty for 'none'), grad-scale
    state [2], call index of the eps used [1])."""
    return _loss.loss_forward(pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean)


@triton_loss.register_fake
def _loss_fake(pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean):
    B = x0.shape[0]
    f32 = dict(dtype=torch.float32, device=x0.device)
    loss = torch.empty((), **f32) if reduce_mean else torch.empty(B, **f32)
    grad = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device) if reduce_mean else pred.new_empty(0)
    return (loss, torch.empty(2, B, **f32), grad, torch.empty(2, **f32),
            torch.empty(1, dtype=torch.int64, device=x0.device))


@torch.library.custom_op("speed_triton::loss_grad", mutates_args=())
def triton_loss_grad(
    pred: Tensor, x0: Tensor, t: Tensor, tables: Tensor, k0: int, k1: int, call_used: Tensor,
    target: int, learn_sigma: bool, grad_output: Tensor,
) -> Tensor:
    return _loss.loss_grad(pred, x0, t, tables, k0, k1, call_used, target, learn_sigma, grad_output)


@triton_loss_grad.register_fake
def _loss_grad_fake(pred, x0, t, tables, k0, k1, call_used, target, learn_sigma, grad_output):
    return torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)


def _save(ctx, inputs, output):
    """What the backward needs (shared by the custom op's autograd and the eager Function)."""
    pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean = inputs
    loss, terms, grad, scale, call_used = output
    ctx.reduce_mean = reduce_mean
    ctx.n_backward = 0
    if reduce_mean:
        ctx.save_for_backward(grad, scale)
    else:
        ctx.save_for_backward(pred, x0, t, tables, call_used)
        ctx.args = (k0, k1, target, learn_sigma)


def _loss_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    _save(ctx, inputs, output)


def _is_traced(x: Tensor) -> bool:
    """True while torch.compile / make_fx traces (fake or functional tensors, proxy modes)."""
    if torch.compiler.is_compiling():
        return True
    return type(x) not in (torch.Tensor, torch.nn.Parameter)


def _grad_pred(ctx, g_loss):
    if g_loss is None:
        return None
    if ctx.reduce_mean:
        grad, scale = ctx.saved_tensors
        if _is_traced(grad):
            # Compiled graphs never mutate the saved gradient, so its scale state is 1.
            return grad * g_loss.to(grad.dtype)
        # Eager (and CUDA-graph capture): scale in place on the device, skipped when
        # grad_output equals the scale already applied; the buffer is then autograd's gradient.
        parity = ctx.n_backward % 2
        ctx.n_backward += 1
        return _loss.scale_grad_(grad, scale, g_loss, parity)
    pred, x0, t, tables, call_used = ctx.saved_tensors
    k0, k1, target, learn_sigma = ctx.args
    if _is_traced(pred):
        return torch.ops.speed_triton.loss_grad(pred, x0, t, tables, k0, k1, call_used, target, learn_sigma, g_loss)
    return _loss.loss_grad(pred, x0, t, tables, k0, k1, call_used, target, learn_sigma, g_loss)


def _loss_backward(ctx, g_loss, g_terms, g_grad, g_scale, g_call):
    return (_grad_pred(ctx, g_loss),) + (None,) * 9


class _EagerLoss(torch.autograd.Function):
    """The eager path: the same kernels without the custom-op dispatch (~3x less host overhead
    per call, which is most of the cost of a loss path at DiT-latent sizes)."""

    @staticmethod
    def forward(ctx, pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean):
        inputs = (pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean)
        output = _loss.loss_forward(*inputs, packed=True)
        _save(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])
        # No zero-filled gradient for the `terms` output: one kernel fewer per backward
        ctx.set_materialize_grads(False)
        return output[0], output[1]

    @staticmethod
    def backward(ctx, g_loss, g_terms):
        return (_grad_pred(ctx, g_loss),) + (None,) * 9


triton_loss.register_autograd(_loss_backward, setup_context=_loss_setup)

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

    def noise(self, x0, t_in, tables, k0, k1, call, mirror, pivot):
        _noise.check_common(x0, tables, call)
        self._check_device(x0)
        if t_in is not None:
            _noise.check_t(t_in, x0.shape[0], x0.device, "t_in")
        args = (x0.detach(), t_in, tables, int(k0), int(k1), call, bool(mirror), int(pivot))
        if torch.compiler.is_compiling():
            x_t, t = torch.ops.speed_triton.noise(*args)
        else:  # eager / CUDA-graph capture: launch directly (no custom-op dispatch overhead)
            x_t, t = _noise.noise_launch(*args)
        if x0.requires_grad and torch.is_grad_enabled():
            # A mutating op cannot carry an autograd formula; x0 is data in training, so the
            # rare differentiable case adds sqrt(ab_t) * (x0 - x0.detach()) (value 0, grad right).
            coef = tables[ROW_SQRT_AB][t].view(-1, *([1] * (x0.dim() - 1)))
            x_t = x_t + (coef * (x0 - x0.detach()).float()).to(x_t.dtype)
        return x_t, t

    def loss(self, pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean):
        _loss.check_loss_inputs(pred, x0, t, tables, call, bool(learn_sigma), target)
        self._check_device(x0)
        args = (pred, x0, t, tables, int(k0), int(k1), call, int(target), bool(learn_sigma), bool(reduce_mean))
        if torch.compiler.is_compiling():
            loss, terms, _grad, _scale, _call_used = torch.ops.speed_triton.loss(*args)
            return loss, terms
        if not (pred.requires_grad and torch.is_grad_enabled()):  # evaluation: no gradient pass
            loss, terms, *_ = _loss.loss_forward(*args, packed=True, need_grad=False)
            return loss, terms
        return _EagerLoss.apply(*args)

    def __repr__(self) -> str:
        return "TritonBackend(interpreted)" if _interpreted() else "TritonBackend()"
