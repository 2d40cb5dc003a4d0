"""The compiled backends (`cpp` on CPU tensors, `cuda` on CUDA tensors) of speed_kernels._C.

Loading `speed_kernels._C` registers the default overloads of the ops of speed_kernels.op_schema
(``torch.ops.speed_kernels.{noise, loss, loss_backward, flow_noise, flow_loss}``, C++ on CPU
tensors, CUDA C++ on CUDA tensors). This module adds their fake kernels (from op_schema) and wraps
them in the backend interface of speed_kernels.backends.

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
    from . import op_schema

    # the ops' fake kernels, declared with their schemas in op_schema (the C++ side defines the ops)
    op_schema.register_fakes_for_default(op for op in op_schema.SCHEMAS if hasattr(torch.ops.speed_kernels, op))
    # csrc/registration.cpp registers the loss's autograd formula in C++ (one native autograd node,
    # no Python per call); an extension built before that gets the same formula from op_schema.
    CPP_AUTOGRAD = torch._C._dispatch_has_kernel_for_dispatch_key("speed_kernels::loss", "Autograd")
    if not CPP_AUTOGRAD:
        op_schema.register_autograd("speed_kernels::loss", op_schema.loss_autograd("default"))
    if hasattr(torch.ops.speed_kernels, "flow_loss"):  # registered with the op, so no caller sees it without
        op_schema.register_autograd("speed_kernels::flow_loss", op_schema.FLOW_LOSS_AUTOGRAD)
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

    def noise(self, x0, t_in, a):
        self._check(x0)
        return _noise_op(x0, t_in, a.tables, int(a.k0), int(a.k1), a.call, bool(a.mirror), int(a.pivot))

    def loss(self, pred, x0, t, a, reduce_mean):
        self._check(x0)
        with_grad = bool(pred.requires_grad and torch.is_grad_enabled())
        call = a.call
        if with_grad and not reduce_mean:
            # backward recomputes from the counter: snapshot it, a later noise call advances it
            call = call.clone()
        loss, terms, _ = _loss_op(
            pred, x0, t, a.tables, int(a.k0), int(a.k1), call, int(a.target), bool(a.learn_sigma), bool(reduce_mean),
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
