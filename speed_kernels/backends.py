"""Backends of the two ops and how `auto` picks one.

Every backend is an object with

* ``name``
* ``supports(device: torch.device) -> bool``
* ``noise(x0, t_in, a) -> (x_t, t)``: draws t (unless ``t_in`` is a given int64 [B] tensor) and
  eps per the RNG contract (speed_kernels.rng), returns x_t in x0's dtype and t as int64; advances
  the device counter ``a.call`` by one. ``a`` is a :class:`speed_kernels.op_schema.DiffusionArgs`
  (tables, key, counter, target, learn_sigma, mirror, pivot: the per-loss constants).
* ``loss(pred, x0, t, a, reduce_mean) -> (loss, terms)``:
  regenerates eps of call index ``a.call - 1``; ``loss`` is the batch-mean scalar
  (``reduce_mean``) or the per-sample [B] float32 loss, differentiable w.r.t. ``pred``;
  ``terms`` is a detached float32 [2, B] tensor of (weighted MSE, VLB) per sample.

``torch-fast`` (speed_kernels/fast_torch.py) follows the same interface but draws with torch's own
generator: the fallback where no kernel backend runs, not a member of the bit-exact contract.

``a.tables`` is the float32 [NUM_ROWS, T] table of speed_kernels.tables on x0's device;
``a.target`` is 0 (eps), 1 (v) or 2 (x0). The kernel backends run the overloads of the ops declared
in speed_kernels.op_schema (``.default``: the compiled extension; ``.triton``: Triton).
"""
from __future__ import annotations

import os
import warnings

import torch

from . import reference
from .fast_torch import TorchFastBackend


class TorchBackend:
    """Plain PyTorch: the reference, the fallback, any device."""

    name = "torch"

    def supports(self, device: torch.device) -> bool:
        return True

    def noise(self, x0, t_in, a):
        return reference.noise(x0, t_in, a.tables, a.k0, a.k1, a.call, a.mirror, a.pivot)

    def loss(self, pred, x0, t, a, reduce_mean):
        return reference.loss(pred, x0, t, a.tables, a.k0, a.k1, a.call, a.target, a.learn_sigma, reduce_mean)


_REGISTRY: dict[str, object] = {"torch": TorchBackend(), "torch-fast": TorchFastBackend()}
_LOAD_ERRORS: dict[str, str] = {}


def _try_load(name: str):
    """Import a compiled or Triton backend on first use; remember why one is missing."""
    if name in _REGISTRY or name in _LOAD_ERRORS:
        return _REGISTRY.get(name)
    try:
        if name == "triton":
            from .ops import triton_backend

            _REGISTRY[name] = triton_backend.TritonBackend()
        elif name in ("cpp", "cuda"):
            from . import _ext

            _REGISTRY[name] = _ext.backend(name)
        else:
            raise ValueError(f"unknown backend {name!r}; known: {KNOWN}")
    except ValueError:
        raise
    except Exception as exc:  # ImportError, a failed build, a missing toolkit
        _LOAD_ERRORS[name] = f"{type(exc).__name__}: {exc}"
        return None
    return _REGISTRY[name]


KNOWN = ("auto", "triton", "cuda", "cpp", "torch", "torch-fast")
# auto's preference per device type; the last entry is the fallback when no kernel backend loads
_AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpp",)}
_ANNOUNCED: set[str] = set()


def backends() -> dict[str, str]:
    """Every backend with 'available' or the reason it is not."""
    out = {}
    for name in KNOWN[1:]:
        b = _try_load(name)
        out[name] = "available" if b is not None else f"unavailable ({_LOAD_ERRORS.get(name)})"
    return out


def _triton_usable(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def auto_choice(device: torch.device) -> tuple[str, str]:
    """(backend name, why) that `auto` runs on `device`."""
    order = _AUTO_ORDER.get(device.type, ())
    missing = []
    for cand in order:
        b = _try_load(cand)
        if b is not None and b.supports(device):
            return cand, f"auto on {device.type}"
        missing.append(f"{cand}: {_LOAD_ERRORS.get(cand) or f'does not run on {device.type}'}")
    why = f"auto on {device.type}: no kernel backend" + (f" ({'; '.join(missing)})" if missing else "")
    return "torch-fast", why


def _announce_fallback(device: torch.device, why: str) -> None:
    if device.type in _ANNOUNCED:
        return
    _ANNOUNCED.add(device.type)
    warnings.warn(
        f"speed_kernels: {why}; running the loss path on 'torch-fast' (plain PyTorch ops and torch's "
        "own generator: same distributions, not the Philox stream of the other backends). "
        "backend='torch' is the bit-exact reference; see speed_kernels.backends() for what is missing.",
        RuntimeWarning,
        stacklevel=3,
    )


def select(name: str, device: torch.device):
    """The backend object for `name` on `device` (`auto`: triton on CUDA, then cuda; cpp on CPU;
    `torch-fast`, announced once, where none of those loads)."""
    if name not in KNOWN:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(KNOWN)}")
    if name == "auto":
        chosen, why = auto_choice(device)
        if chosen == "torch-fast":
            _announce_fallback(device, why)
        return _REGISTRY[chosen]
    b = _try_load(name)
    if b is None:
        raise ValueError(f"backend {name!r} is not available: {_LOAD_ERRORS.get(name)}")
    if not b.supports(device):
        raise ValueError(f"backend {name!r} does not run on device {device}")
    return b


def numerics_env() -> dict[str, str]:
    """Every SPEED_* environment variable that is set ({name: value}): the knobs that may change
    numerics, recorded in run.json / summary.json / results files."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("SPEED_")}


class _CallableModule(type(os)):
    """`speed_kernels.backends()` must keep working after this submodule is imported: the import
    system then binds the package attribute `backends` to the module, so the module answers calls."""

    def __call__(self) -> dict[str, str]:
        return backends()


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
