"""The compiled backends (`cpp` on CPU tensors, `cuda` on CUDA tensors) of speed_kernels._C.

Loading `speed_kernels._C` registers the ops ``torch.ops.speed_kernels.{noise, loss,
loss_backward}`` (csrc/bindings.cpp). This module adds what torch.compile and autograd need
(fake kernels, the autograd formula) and wraps the ops in the backend interface of
speed_kernels.backends.

Autograd: with the mean reduction the loss op writes d loss / d pred in the forward pass (one pass
over the data, Liger-Kernel style) and backward scales it by grad_output; with reduction "none"
the forward writes nothing and backward recomputes the gradient, fused with the per-sample
grad_output, from a snapshot of the call counter. x0 is data: no gradient flows to it.
"""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.speed_kernels.*)

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = (
        f"speed_kernels._C is not built or failed to load ({type(exc).__name__}: {exc}); build it with "
        "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`"
    )


def available() -> dict:
    """What the compiled extension provides: {'built', 'cpu', 'cuda', 'cpu_avx2', 'error'}."""
    if _C is None:
        return {"built": False, "cpu": False, "cuda": False, "cpu_avx2": False, "error": _IMPORT_ERROR}
    return {
        "built": True,
        "cpu": True,
        "cuda": bool(_C.has_cuda()),
        "cpu_avx2": bool(_C.cpu_avx2),
        "error": None,
    }


if _C is not None:
    _ops = torch.ops.speed_kernels

    @torch.library.register_fake("speed_kernels::noise")
    def _noise_fake(x0, t_in, tables, k0, k1, call, mirror, pivot):
        return torch.empty_like(x0), x0.new_empty((x0.shape[0],), dtype=torch.int64)

    @torch.library.register_fake("speed_kernels::loss")
    def _loss_fake(pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean, with_grad):
        b = x0.shape[0]
        loss = x0.new_empty(() if reduce_mean else (b,), dtype=torch.float32)
        terms = x0.new_empty((2, b), dtype=torch.float32)
        grad = torch.empty_like(pred) if with_grad else pred.new_empty((0,))
        return loss, terms, grad

    @torch.library.register_fake("speed_kernels::loss_backward")
    def _loss_backward_fake(grad_loss, pred, x0, t, tables, k0, k1, call, target, learn_sigma):
        return torch.empty_like(pred)

    def _loss_setup_context(ctx, inputs, output):
        pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean, with_grad = inputs
        # terms and the gradient buffer carry no gradient: do not materialise zeros for them
        # (a pred-sized fill per step otherwise)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.reduce_mean = reduce_mean
        ctx.with_grad = with_grad
        ctx.args = (k0, k1, target, learn_sigma)
        if reduce_mean:
            ctx.save_for_backward(output[2])  # the gradient the forward wrote
        else:
            ctx.save_for_backward(pred, x0, t, tables, call)

    def _loss_backward(ctx, grad_loss, grad_terms, grad_grad):
        if grad_loss is None:
            return (None,) * 11
        if ctx.reduce_mean:
            (grad,) = ctx.saved_tensors
            if not ctx.with_grad:
                raise RuntimeError(
                    "speed_kernels::loss was run with with_grad=False; call it with with_grad=True to backprop"
                )
            g = grad_loss.to(grad.dtype)
            if type(grad) is torch.Tensor and not torch.compiler.is_compiling():
                # Eager: in place, the buffer is ours and used once (a retain_graph second backward
                # fails the saved-tensor version check instead of scaling twice); saves a
                # pred-sized allocation and its page faults.
                dpred = grad.mul_(g)
            else:  # traced (fake / functional tensors): out of place, as the partitioner wants
                dpred = grad * g
        else:
            pred, x0, t, tables, call = ctx.saved_tensors
            k0, k1, target, learn_sigma = ctx.args
            dpred = _ops.loss_backward(grad_loss, pred, x0, t, tables, k0, k1, call, target, learn_sigma)
        return (dpred,) + (None,) * 10

    # csrc/registration.cpp registers the formula in C++ (one native autograd node, no Python per
    # call); an extension built before that gets the same formula from here.
    CPP_AUTOGRAD = torch._C._dispatch_has_kernel_for_dispatch_key("speed_kernels::loss", "Autograd")
    if not CPP_AUTOGRAD:
        torch.library.register_autograd("speed_kernels::loss", _loss_backward, setup_context=_loss_setup_context)


if _C is not None:
    # the OpOverloads, not the packets: the packet resolves the overload on every call (~3 us)
    _noise_op = torch.ops.speed_kernels.noise.default
    _loss_op = torch.ops.speed_kernels.loss.default


class ExtBackend:
    """The backends.py interface over the compiled ops, for one device type."""

    def __init__(self, name: str):
        self.name = name
        self.device_type = "cpu" if name == "cpp" else "cuda"

    def __repr__(self) -> str:
        return f"ExtBackend({self.name!r})"

    def supports(self, device) -> bool:
        return torch.device(device).type == self.device_type

    def _check(self, x0: torch.Tensor, what: str = "x0") -> None:
        if x0.device.type != self.device_type:
            raise ValueError(f"backend {self.name!r} runs on {self.device_type} tensors; {what} is on {x0.device}")
        if x0.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"backend {self.name!r} treats x0 as data and gives it no gradient; x0 requires grad "
                "(detach it, or use backend='torch')"
            )

    def noise(self, x0, t_in, tables, k0, k1, call, mirror, pivot):
        self._check(x0)
        return _noise_op(x0, t_in, tables, int(k0), int(k1), call, bool(mirror), int(pivot))

    def loss(self, pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean):
        self._check(x0)
        with_grad = bool(pred.requires_grad and torch.is_grad_enabled())
        if with_grad and not reduce_mean:
            # backward recomputes from the counter: snapshot it, a later noise call advances it
            call = call.clone()
        loss, terms, _ = _loss_op(
            pred, x0, t, tables, int(k0), int(k1), call, int(target), bool(learn_sigma), bool(reduce_mean),
            with_grad and bool(reduce_mean),
        )
        return loss, terms


def backend(name: str) -> ExtBackend:
    """The `cpp` or `cuda` backend; ImportError saying why when it is not available."""
    if name not in ("cpp", "cuda"):
        raise ValueError(f"the compiled extension provides backends 'cpp' and 'cuda', not {name!r}")
    if _C is None:
        raise ImportError(_IMPORT_ERROR)
    if name == "cuda" and not _C.has_cuda():
        raise ImportError(
            "speed_kernels._C was built without the CUDA kernels (no CUDA build of torch or no nvcc at "
            "build time); rebuild with a CUDA torch (SPEED_KERNELS_CUDA=1 to insist)"
        )
    return ExtBackend(name)


__all__ = ["available", "backend", "ExtBackend"]
