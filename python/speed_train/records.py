"""What a run writes down about itself: provenance (versions, git commit, machine), a training
run's run.json, its metrics.jsonl log and its loss plot.

run.json is written atomically at the start of every (resumed) run; metrics.jsonl holds one JSON
line per log step and, on resume, keeps only the lines up to the checkpoint's step.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .models import count_params

__all__ = ["write_text_atomic", "git_commit", "versions", "provenance", "describe_backend", "run_record",
           "open_metrics", "read_metrics", "plot_loss"]


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- provenance


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def versions() -> dict:
    """The versions of Python, torch, numpy, speed_kernels and speed_train."""
    from . import __version__ as speed_train_version

    try:
        import speed_kernels

        sk_version = getattr(speed_kernels, "__version__", None)
    except Exception:  # pragma: no cover
        sk_version = None
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "speed_kernels": sk_version, "speed_train": speed_train_version}


def provenance(command: str | None, device: str, produced_by: str) -> dict:
    """Where and how a study's results were made: the command (default: this process's), date,
    machine (CPU model, CPU count, torch threads), device, versions, git commit, SPEED_* knobs."""
    from speed_kernels.backends import numerics_env

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = device
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return {
        "produced_by": produced_by,
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "device": dev,
        "versions": versions(),
        "git_commit": git_commit(),
        "numerics_env": numerics_env(),  # SPEED_* knobs that may change numerics
    }


# ---------------------------------------------------------------------------------- run.json


def describe_backend(loss_fn, device: torch.device, requested) -> dict:
    """Which loss backend runs and why, e.g. {"requested": "auto", "resolved": "cpp",
    "reason": "auto on cpu"} or "auto on cpu: no kernel backend (cpp: <why>)"."""
    requested = str(requested)
    try:
        resolved = loss_fn.backend(device).name
    except Exception as exc:  # an older or foreign loss object
        return {"requested": requested, "resolved": None, "reason": f"unknown ({exc})"}
    if requested == "auto":
        from speed_kernels.backends import auto_choice

        _, reason = auto_choice(device)  # names the kernel backends it had to pass over
    else:
        reason = f"requested on {device.type}"
    return {"requested": requested, "resolved": resolved, "reason": reason}


def run_record(trainer) -> dict:
    """The content of a training run's run.json (``trainer``: a speed_train.trainer.Trainer)."""
    from speed_kernels.backends import numerics_env

    t = trainer
    return {
        "produced_by": "speed-kernels train (speed_train.Trainer)",
        "command": sys.argv,
        "config": dataclasses.asdict(t.cfg),
        "model_args": t.model_args,
        "params": count_params(t.model),
        "data": {"name": t.data.name, "n": len(t.data), "shape": list(t.data.shape),
                 "num_classes": t.num_classes, "flip": t.data.flip},
        "loss": repr(t.loss_fn),
        "backend": f"{t.backend_info['requested']} -> {t.backend_info['resolved']}",
        "backend_info": t.backend_info,
        "numerics_env": numerics_env(),
        "device": str(t.device) + (f" ({torch.cuda.get_device_name(t.device)})"
                                   if t.device.type == "cuda" else f" ({os.cpu_count()} CPUs)"),
        "world_size": t.world_size,
        "versions": versions(),
        "git_commit": git_commit(),
        "resumed_from_step": t.resumed_from,
        "resumed_from_file": str(t.resume_file) if t.resume_file else None,
        "overrides": t.override_diffs,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---------------------------------------------------------------------------------- metrics.jsonl


def open_metrics(path: Path, resumed_from: int | None):
    """metrics.jsonl opened for appending, line-buffered. On resume it keeps the log up to the
    checkpoint's step (later lines belong to a lost future; a line cut by a crash is dropped);
    rewritten atomically so a crash here loses nothing."""
    keep = []
    if resumed_from is not None and path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= resumed_from:
                    keep.append(line)
            except json.JSONDecodeError:
                pass
    write_text_atomic(path, "".join(line + "\n" for line in keep))
    return open(path, "a", buffering=1)


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(rows: list[dict], path: Path, title: str) -> str | None:
    """The logged loss against the step (log scale, with a moving mean) as a PNG at ``path``;
    None when no row has a loss."""
    rows = [r for r in rows if r.get("loss") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss (mean over each log interval)")
    if len(loss) >= 5:
        k = max(2, len(loss) // 20)
        sm = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], sm, lw=1.6, label=f"moving mean of {k}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("weighted loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return str(path)
