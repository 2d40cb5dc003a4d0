"""The compiled (`cpp`) flow-matching ops of speed_kernels._C: fake kernels for torch.compile,
the autograd formula, and the wrapper speed_kernels.flow calls.

torch.ops.speed_kernels.flow_noise / flow_loss come from csrc/flow_cpu.cpp (registered in
csrc/registration.cpp). flow_loss returns per-sample losses and d(sum of them)/d pred; backward
multiplies that by grad_output[b]. The call index of the eps is snapshotted (call - 1) in the
forward, so a later noise() before backward does not change it.
"""
from __future__ import annotations

import torch

try:
    from . import _ext  # loads speed_kernels._C (registers the ops) and the DDPM fakes

    _HAVE = _ext._C is not None and hasattr(torch.ops.speed_kernels, "flow_noise")
except Exception:  # pragma: no cover - not built
    _HAVE = False


def available() -> bool:
    """Whether speed_kernels._C was built with csrc/flow_cpu.cpp."""
    return _HAVE


if _HAVE:

    @torch.library.register_fake("speed_kernels::flow_noise")
    def _noise_fake(x0, sigma_in, tables, k0, k1, call):
        return torch.empty_like(x0), x0.new_empty((x0.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("speed_kernels::flow_loss")
    def _loss_fake(pred, x0, sigma, tables, k0, k1, call_used, target, inv_sigma2, with_grad):
        per = x0.new_empty((x0.shape[0],), dtype=torch.float32)
        return per, (torch.empty_like(pred) if with_grad else pred.new_empty((0,)))

    def _setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(output[1])
        ctx.with_grad = inputs[-1]
        ctx.save_for_backward(output[1])

    def _backward(ctx, g_per, g_grad):
        if g_per is None:
            return (None,) * 10
        if not ctx.with_grad:
            raise RuntimeError("speed_kernels::flow_loss ran with with_grad=False; no gradient to give")
        (grad,) = ctx.saved_tensors
        return (grad * g_per.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1))),) + (None,) * 9

    torch.library.register_autograd("speed_kernels::flow_loss", _backward, setup_context=_setup)


def flow_loss(pred, x0, sigma, tables, k0, k1, call, target, inv_sigma2, reduce_mean):
    """(loss, terms) with the cpp op: batch mean or per-sample [B]; terms detached [B]."""
    if not _HAVE:
        raise ImportError("speed_kernels._C has no flow ops: rebuild with `python setup.py build_ext --inplace`")
    if x0.requires_grad and torch.is_grad_enabled():
        raise ValueError("the cpp flow backend treats x0 as data and gives it no gradient; detach x0 "
                         "(or use backend='torch')")
    with_grad = bool(pred.requires_grad and torch.is_grad_enabled())
    per, _ = torch.ops.speed_kernels.flow_loss(pred, x0, sigma, tables, int(k0), int(k1), call - 1, int(target),
                                               bool(inv_sigma2), with_grad)
    return (per.mean() if reduce_mean else per), per.detach()
