"""The op contract: every op of the `speed_kernels` torch library, declared once.

Each op has one schema (below), one fake kernel, one autograd formula, and one implementation per
backend registered as an overload of the same op name:

    torch.ops.speed_kernels.<op>.default   the compiled extension (speed_kernels._C): C++ on CPU
                                           tensors, CUDA C++ on CUDA tensors (registered per
                                           dispatch key in csrc/registration.cpp)
    torch.ops.speed_kernels.<op>.triton    the Triton kernels (speed_kernels/ops/): CUDA tensors,
                                           or CPU tensors under TRITON_INTERPRET=1

Two overloads, not one kernel per dispatch key, because CUDA has two implementations a user picks
between (backend="triton" or "cuda"); both draw the same bits (the RNG contract of
speed_kernels.rng). The plain-PyTorch reference (speed_kernels.reference) is the oracle both are
tested against (tests/test_op_contract.py runs opcheck on every overload that runs here).

The C++ side reads the schema strings from csrc/op_schemas.h, generated from this file by
``python -m speed_kernels.op_schema > csrc/op_schemas.h`` (tests/test_op_contract.py fails when
it is stale), so an argument is added in one place.

Ops (B = batch, x0 any shape [B, ...], float32 / float16 / bfloat16; the C++ CPU kernels also take
float64; every arithmetic in float32):

noise(x0, t_in?, tables, k0, k1, call!, mirror, pivot) -> (x_t, t)
    Draws t ~ the CDF row of ``tables`` (unless ``t_in``, int64 [B], is given; ``mirror`` adds
    SpeeD's mirrored draw around ``pivot``), eps ~ N(0, 1) per the Philox stream (key k0, k1,
    call index ``call``), writes x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps in x0's dtype; t int64
    [B]. Mutates ``call`` (int64 [1] on x0's device): +1. No gradient (x0 is data).
loss(pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean, with_grad)
        -> (loss, terms, grad)
    Regenerates the eps of call index ``call - 1`` and scores ``pred`` (x0's shape, 2C channels
    when ``learn_sigma``) against the target (0 eps, 1 v, 2 x0): per sample, weight[t] * MSE
    (+ the VLB term of DiT's hybrid loss with the mean detached when ``learn_sigma``). ``loss``:
    float32 scalar (batch mean, ``reduce_mean``) or [B]; ``terms``: float32 [2, B] (weighted MSE,
    VLB), no gradient; ``grad``: d loss / d pred written in the same pass when ``with_grad``
    (which requires ``reduce_mean``), else an empty tensor.
    Backward: reduce_mean -> saves ``grad``; d pred = grad * grad_loss.
              none        -> saves (pred, x0, t, tables, call); d pred = loss_backward(...).
loss_backward(grad_loss, pred, x0, t, tables, k0, k1, call, target, learn_sigma) -> d pred
    d (sum_b grad_loss[b] * loss_b) / d pred, recomputed from the inputs (eps of ``call - 1``).
flow_noise(x0, sigma_in?, tables, k0, k1, call!) -> (x_t, sigma)
    Flow matching: sigma by inverse CDF on the quantile rows of ``tables`` (unless ``sigma_in``,
    float [B], is given), x_t = (1 - sigma) x0 + sigma eps; sigma float32 [B]. Mutates ``call``.
flow_loss(pred, x0, sigma, tables, k0, k1, call_used, target, inv_sigma2, with_grad) -> (per, grad)
    Regenerates the eps of call index ``call_used`` (a snapshot, not the counter): per-sample
    w(sigma) * MSE(pred, target) float32 [B] and, with ``with_grad``, d sum(per) / d pred.
    Backward: saves ``grad``; d pred = grad * grad_per[b] (per sample).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

NAMESPACE = "speed_kernels"

# name -> schema (arguments and returns); `Tensor(a!)` marks the counter the op advances.
SCHEMAS: dict[str, str] = {
    "noise": "(Tensor x0, Tensor? t_in, Tensor tables, int k0, int k1, Tensor(a!) call, bool mirror, int pivot)"
             " -> (Tensor, Tensor)",
    "loss": "(Tensor pred, Tensor x0, Tensor t, Tensor tables, int k0, int k1, Tensor call, int target,"
            " bool learn_sigma, bool reduce_mean, bool with_grad) -> (Tensor, Tensor, Tensor)",
    "loss_backward": "(Tensor grad_loss, Tensor pred, Tensor x0, Tensor t, Tensor tables, int k0, int k1,"
                     " Tensor call, int target, bool learn_sigma) -> Tensor",
    "flow_noise": "(Tensor x0, Tensor? sigma_in, Tensor tables, int k0, int k1, Tensor(a!) call)"
                  " -> (Tensor, Tensor)",
    "flow_loss": "(Tensor pred, Tensor x0, Tensor sigma, Tensor tables, int k0, int k1, Tensor call_used,"
                 " int target, bool inv_sigma2, bool with_grad) -> (Tensor, Tensor)",
}


# ----------------------------------------------------------------------------- backend arguments
class DiffusionArgs(NamedTuple):
    """What every backend's noise()/loss() takes besides the batch: the per-loss constants.

    tables: float32 [NUM_ROWS, T] on the data's device (speed_kernels.tables); k0, k1: the Philox
    key; call: int64 [1] device counter; target: 0 eps, 1 v, 2 x0; learn_sigma: DiT's hybrid loss;
    mirror, pivot: SpeeD's mirrored draw (ignored when t is given)."""

    tables: Tensor
    k0: int
    k1: int
    call: Tensor
    target: int = 0
    learn_sigma: bool = False
    mirror: bool = False
    pivot: int = 0


class FlowArgs(NamedTuple):
    """The flow-matching counterpart: tables float32 [FLOW_NUM_ROWS, N + 1] (quantiles, slopes,
    weight), the key, the counter, the target and whether the weight carries sigma^-2."""

    tables: Tensor
    k0: int
    k1: int
    call: Tensor
    target: int = 1
    inv_sigma2: bool = False


# ----------------------------------------------------------------------------- fake kernels
def _noise_fake(x0, t_in, tables, k0, k1, call, mirror, pivot):
    return torch.empty_like(x0), x0.new_empty((x0.shape[0],), dtype=torch.int64)


def _loss_fake(pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean, with_grad):
    b = x0.shape[0]
    loss = x0.new_empty(() if reduce_mean else (b,), dtype=torch.float32)
    terms = x0.new_empty((2, b), dtype=torch.float32)
    grad = torch.empty_like(pred) if with_grad else pred.new_empty((0,))
    return loss, terms, grad


def _loss_backward_fake(grad_loss, pred, x0, t, tables, k0, k1, call, target, learn_sigma):
    return torch.empty_like(pred)


def _flow_noise_fake(x0, sigma_in, tables, k0, k1, call):
    return torch.empty_like(x0), x0.new_empty((x0.shape[0],), dtype=torch.float32)


def _flow_loss_fake(pred, x0, sigma, tables, k0, k1, call_used, target, inv_sigma2, with_grad):
    per = x0.new_empty((x0.shape[0],), dtype=torch.float32)
    return per, (torch.empty_like(pred) if with_grad else pred.new_empty((0,)))


FAKES = {"noise": _noise_fake, "loss": _loss_fake, "loss_backward": _loss_backward_fake,
         "flow_noise": _flow_noise_fake, "flow_loss": _flow_loss_fake}


# ----------------------------------------------------------------------------- autograd formulas
def loss_autograd(overload: str):
    """(setup_context, backward) of `loss` for one overload (the `none` backward calls that
    overload's loss_backward). The compiled extension registers the same formula in C++."""

    def setup_context(ctx, inputs, output):
        pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean, with_grad = inputs
        ctx.set_materialize_grads(False)  # terms and grad carry no gradient: no zero fills
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.reduce_mean, ctx.with_grad = reduce_mean, with_grad
        ctx.args = (k0, k1, target, learn_sigma)
        if reduce_mean:
            ctx.save_for_backward(output[2])
        else:
            ctx.save_for_backward(pred, x0, t, tables, call)

    def backward(ctx, grad_loss, grad_terms, grad_grad):
        if grad_loss is None:
            return (None,) * 11
        if ctx.reduce_mean:
            if not ctx.with_grad:
                raise RuntimeError(f"{NAMESPACE}::loss was run with with_grad=False; run it with with_grad=True "
                                   "to backprop")
            (grad,) = ctx.saved_tensors
            dpred = grad * grad_loss.to(grad.dtype)
        else:
            pred, x0, t, tables, call = ctx.saved_tensors
            k0, k1, target, learn_sigma = ctx.args
            op = getattr(torch.ops.speed_kernels.loss_backward, overload)
            dpred = op(grad_loss, pred, x0, t, tables, k0, k1, call, target, learn_sigma)
        return (dpred,) + (None,) * 10

    return setup_context, backward


def _flow_loss_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[1])
    ctx.with_grad = inputs[-1]
    ctx.save_for_backward(output[1])


def _flow_loss_backward(ctx, grad_per, grad_grad):
    if grad_per is None:
        return (None,) * 10
    if not ctx.with_grad:
        raise RuntimeError(f"{NAMESPACE}::flow_loss ran with with_grad=False; no gradient to give")
    (grad,) = ctx.saved_tensors
    return (grad * grad_per.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1))),) + (None,) * 9


FLOW_LOSS_AUTOGRAD = (_flow_loss_setup, _flow_loss_backward)


# ----------------------------------------------------------------------------- registration
_LIB = None


def _fragment():
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
    return _LIB


def define_overload(op: str, overload: str, impl, dispatch_keys=("CPU", "CUDA")) -> None:
    """Declare `speed_kernels::<op>.<overload>` from SCHEMAS, register its kernel for the given
    dispatch keys and the op's fake kernel (a backend's own overload, e.g. the Triton one).
    Import speed_kernels._ext first, so the compiled extension (where built) defines the op's
    default overload before this fragment adds to it."""
    lib = _fragment()
    lib.define(f"{op}.{overload}{SCHEMAS[op]}")
    qual = f"{NAMESPACE}::{op}.{overload}"
    for key in dispatch_keys:
        lib.impl(f"{op}.{overload}", impl, key)
    torch.library.register_fake(qual, FAKES[op], lib=lib)


def register_autograd(qualname: str, formula) -> None:
    """Register a (setup_context, backward) pair of this module for one overload."""
    setup_context, backward = formula
    torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_fragment())


def register_fakes_for_default(ops) -> None:
    """The fake kernels of the compiled extension's overloads (defined in C++ from op_schemas.h)."""
    for op in ops:
        torch.library.register_fake(f"{NAMESPACE}::{op}", FAKES[op], lib=_fragment())


def c_header() -> str:
    """csrc/op_schemas.h: the schema strings for TORCH_LIBRARY(speed_kernels) (torch-free C++)."""
    lines = [
        "// Generated from speed_kernels/op_schema.py by `python -m speed_kernels.op_schema > csrc/op_schemas.h`.",
        "// Do not edit: change SCHEMAS there and regenerate (tests/test_op_contract.py checks this file).",
        "#pragma once",
        "",
    ]
    for name, schema in SCHEMAS.items():
        lines.append(f"#define SK_SCHEMA_{name.upper()} \"{name}{schema}\"")
    return "\n".join(lines) + "\n"


__all__ = ["SCHEMAS", "DiffusionArgs", "FlowArgs", "FAKES", "loss_autograd", "FLOW_LOSS_AUTOGRAD", "define_overload",
           "register_autograd", "register_fakes_for_default", "c_header"]

if __name__ == "__main__":
    print(c_header(), end="")
