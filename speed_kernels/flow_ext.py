"""The compiled (`cpp` and `cuda`) flow-matching ops of speed_kernels._C: which devices have them,
and the wrapper speed_kernels.flow calls (fake kernels and the autograd formula come from
speed_kernels.op_schema, registered by speed_kernels._ext when the extension loads).

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


# device types with flow kernels, read once (a dispatcher query is not traceable by torch.compile)
_DEVICE_TYPES = frozenset(
    t for t, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if _HAVE and torch._C._dispatch_has_kernel_for_dispatch_key("speed_kernels::flow_noise", key)
)


def available(device_type: str = "cpu") -> bool:
    """Whether speed_kernels._C has the flow kernels for this device type ("cpu" or "cuda")."""
    return device_type in _DEVICE_TYPES


def flow_loss(pred, x0, sigma, a, reduce_mean):
    """(loss, terms) with the cpp op: batch mean or per-sample [B]; terms detached [B]."""
    if not _HAVE:
        raise ImportError("speed_kernels._C has no flow ops: rebuild with `python setup.py build_ext --inplace`")
    if x0.requires_grad and torch.is_grad_enabled():
        raise ValueError("the compiled flow backends treat x0 as data and give it no gradient; detach x0 "
                         "(or use backend='torch')")
    with_grad = bool(pred.requires_grad and torch.is_grad_enabled())
    per, _ = torch.ops.speed_kernels.flow_loss(pred, x0, sigma, a.tables, int(a.k0), int(a.k1), a.call - 1,
                                               int(a.target), bool(a.inv_sigma2), with_grad)
    return (per.mean() if reduce_mean else per), per.detach()
