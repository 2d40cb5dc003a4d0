"""Training checkpoints that survive a crash at any moment.

Layout of a run folder: ``ckpt-<step:07d>.pt`` for the last N saves (``keep``, default 2) and
``ckpt.pt``, a hard link to the newest (a copy where links are not supported), so
``--resume`` and ``speed-kernels sample --ckpt <out>/ckpt.pt`` keep working.

Each save writes a temporary file, fsyncs it, renames it into place with ``os.replace`` (atomic on
POSIX and Windows) and fsyncs the folder, so after a crash or power loss every ``ckpt*.pt`` name
holds either a whole old checkpoint or a whole new one, never a mix.

The state is made of plain containers, numbers, strings and tensors only, so it loads with
``torch.load(weights_only=True)``: a checkpoint from elsewhere cannot run code when loaded.
A file that does not load (truncated, garbage) is reported in one line naming it, and
:func:`load_latest` falls back to the next older one, saying so.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["CheckpointError", "save_atomic", "save_rotating", "checkpoint_files", "load_file", "load_latest",
           "remove_all", "numpy_rng_to_state", "numpy_rng_from_state", "LATEST"]

LATEST = "ckpt.pt"
_STEP_RE = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


def _fsync_dir(folder: Path) -> None:
    # makes the rename itself durable; not possible on Windows (opening a folder fails), where
    # os.replace is already durable enough for our purposes
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _before_fsync() -> None:
    """Called between writing a checkpoint's temp file and syncing it. A no-op: the fault tests
    replace it (tests/train/slow_save.py) to widen the window a SIGKILL can land in."""


def save_atomic(state: dict, path: Path) -> None:
    """torch.save to ``path`` via temp file + fsync + os.replace + fsync of the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            _before_fsync()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _link_latest(target: Path) -> None:
    """Point ``ckpt.pt`` at ``target`` atomically (hard link, else a copy)."""
    latest = target.with_name(LATEST)
    tmp = target.with_name(f".{LATEST}.tmp{os.getpid()}")
    try:
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(target, tmp)
        except OSError:
            shutil.copyfile(target, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, latest)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(target.parent)


def checkpoint_files(folder: Path) -> list[tuple[int, Path]]:
    """The step-named checkpoints in ``folder``, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def save_rotating(state: dict, folder: Path, step: int, keep: int = 2) -> Path:
    """Save ``state`` as ``folder/ckpt-<step>.pt``, point ``ckpt.pt`` at it, then delete the
    step files beyond the newest ``keep`` and any of a later step (the lost future of an earlier
    attempt that this run replaced). Only after the new file is durable is anything deleted."""
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    folder = Path(folder)
    for stale in folder.glob(".ckpt*.tmp*"):  # left by a writer killed mid-save
        if not stale.name.endswith(f".tmp{os.getpid()}"):
            stale.unlink(missing_ok=True)
    path = folder / f"ckpt-{step:07d}.pt"
    save_atomic(state, path)
    _link_latest(path)
    kept = 0
    for s, p in checkpoint_files(folder):
        if s > step:
            p.unlink(missing_ok=True)
        elif kept < keep:
            kept += 1
        else:
            p.unlink(missing_ok=True)
    return path


def remove_all(folder: Path) -> None:
    """Delete every checkpoint of the run folder (``ckpt.pt`` and the step files)."""
    folder = Path(folder)
    for _, p in checkpoint_files(folder):
        p.unlink(missing_ok=True)
    (folder / LATEST).unlink(missing_ok=True)


def load_file(path: Path) -> dict:
    """Load one checkpoint with weights_only=True; anything wrong -> CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, a pickle with code in it
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {first[:160]})") from None
    if not isinstance(st, dict) or st.get("format") != "speed_train/1":
        raise CheckpointError(f"{path} is not a speed-kernels training checkpoint")
    return st


def load_latest(folder: Path, log=print) -> tuple[dict, Path]:
    """The newest checkpoint of ``folder`` that loads, with its path. Unreadable ones are
    reported through ``log`` (one line each) and skipped; none at all -> FileNotFoundError,
    only unreadable ones -> CheckpointError."""
    folder = Path(folder)
    candidates = [p for _, p in checkpoint_files(folder)]
    if not candidates and (folder / LATEST).is_file():
        candidates = [folder / LATEST]  # a folder written before step-named files
    if not candidates:
        raise FileNotFoundError(f"--resume: no checkpoint in {folder}")
    errors = []
    for i, p in enumerate(candidates):
        try:
            st = load_file(p)
        except CheckpointError as exc:
            errors.append(str(exc))
            nxt = candidates[i + 1] if i + 1 < len(candidates) else None
            log(f"{exc}; " + (f"falling back to {nxt}" if nxt else "no older checkpoint left"))
            continue
        return st, p
    raise CheckpointError(f"no readable checkpoint in {folder}: " + "; ".join(errors))


def numpy_rng_to_state() -> dict:
    """np.random's global state as weights-only-loadable values (its key array as a tensor)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}


def numpy_rng_from_state(d: dict) -> None:
    np.random.set_state((d["kind"], d["key"].numpy().astype(np.uint32), d["pos"], d["has_gauss"],
                         d["cached_gaussian"]))
