"""Non-finite steps: when the training loop checks for them, and the error that stops it.

Per-step work has no host sync on CUDA: a device-side flag records the first step with a
non-finite loss or gradient norm, checked at every side step (log, checkpoint, sample, eval, end)
before anything is written, so a poisoned state is never checkpointed. On CPU (where a
``.item()`` costs nothing: there is no asynchronous queue to drain) and with
``skip_nonfinite > 0`` (which must decide before the optimizer step) it is checked every step,
and so it is for a strategy that learns from the losses on the host. A bad step on one rank is
bad on every rank: they skip or stop together.
"""
from __future__ import annotations

import torch

from .distributed import learns_from_losses

__all__ = ["NonFiniteError", "checks_every_step", "nonfinite", "note_first_bad", "stop_message"]


class NonFiniteError(RuntimeError):
    """Training stopped at a step whose loss or gradient norm is not finite."""


def checks_every_step(device: torch.device, skip_nonfinite: int, strategy) -> bool:
    """Whether the loop checks every step on the host (else: the deferred device-side record)."""
    # CPU: .item() is free (no asynchronous queue), so check every step and stop before the
    # optimizer applies a NaN; skip_nonfinite must decide before the step too. CUDA: a
    # device-side record of the first bad step, read at side steps (no per-step sync).
    # A strategy that learns from the losses copies them to the host every step anyway (and
    # must never learn from a NaN), so it is checked every step too.
    # (a strategy that learns on the device ignores non-finite losses and needs no host copy)
    return (device.type != "cuda" or skip_nonfinite > 0
            or (learns_from_losses(strategy) and not getattr(strategy, "device_rows", False)))


def nonfinite(loss: torch.Tensor, gn: torch.Tensor) -> torch.Tensor:
    """A device flag: the loss or the gradient norm is not finite."""
    return ~(torch.isfinite(loss) & torch.isfinite(gn))


def note_first_bad(first_bad: torch.Tensor, bad: torch.Tensor, step: int) -> torch.Tensor:
    """The device-side record: ``step`` when this step is bad and none was before (-1: none)."""
    return torch.where(bad & (first_bad < 0), step, first_bad)


def stop_message(step: int, loss: float | None, gn: float | None, skipped: int, last_good_ckpt,
                 skip_nonfinite: int) -> str:
    what = "" if loss is None else f" (loss {loss}, grad norm {gn})"
    skipped_s = f" after skipping {skipped} such step(s)" if skipped else ""
    good = (f"the last good checkpoint is {last_good_ckpt}" if last_good_ckpt
            else "no checkpoint was written")
    return (f"non-finite loss or gradient norm at step {step}{what}{skipped_s}: training stopped; "
            f"{good}" + ("" if skip_nonfinite else " (--skip-nonfinite N skips up to N such steps)"))
