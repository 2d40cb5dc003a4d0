"""Fault injection: SIGKILL a training process at random moments (some inside a checkpoint
write), resume until done, and require the metrics and final weights of an uninterrupted run
bit for bit; under torchrun a failed save fails every rank (no hang) and another world size is
refused on resume."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from speed_train import checkpoint as ckpt_io
from speed_train.cli import build_parser, config_from_args
from speed_train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
SLOW_SAVE = Path(__file__).with_name("slow_save.py")
ARGS = ["train", "--device", "cpu", "--model", "unet-tiny", "--strategy", "importance", "--steps", "10",
        "--batch-size", "8", "--log-every", "1", "--ckpt-every", "2", "--sample-n", "0", "--no-progress",
        "--threads", "1"]
KEYS = ("step", "loss", "grad_norm", "lr", "epoch")  # steps_per_s is a timing


def _rows(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [tuple(r[k] for k in KEYS) for r in rows]


def _trainer(argv):
    cfg, chosen = config_from_args(build_parser().parse_args(argv))
    return Trainer(cfg, explicit=chosen)


def _wait(proc, cond, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if cond():
            return True
        time.sleep(0.002)
    raise AssertionError("timed out waiting for the training process")


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_exact(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _trainer(ARGS + ["--out", str(tmp_path / "ref")]).run()
    finally:
        torch.set_num_threads(n)

    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rng = random.Random(1234)
    kills, mid_write = 0, 0
    for attempt in range(20):
        resume = ["--resume"] if ckpt_io.checkpoint_files(out) else []
        # slow_save.py: the CLI with a 0.15 s pause inside every checkpoint write, so kills land in one
        proc = subprocess.Popen([sys.executable, str(SLOW_SAVE), *ARGS, "--out", str(out), *resume],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            if attempt < 3:  # each start imports torch: a few seconds, so three kills
                if attempt % 2 == 0:  # inside a checkpoint write: its temp file exists
                    mine = f".ckpt-*.tmp{proc.pid}"
                    hit = _wait(proc, lambda: any(out.glob(mine)))
                else:  # anywhere, once this attempt has trained a step
                    base = len(_rows(out)) if (out / "metrics.jsonl").exists() else 0
                    hit = _wait(proc, lambda: (out / "metrics.jsonl").exists() and len(
                        (out / "metrics.jsonl").read_text().splitlines()) > base)
                    time.sleep(rng.uniform(0.0, 0.4))
                if hit and proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    kills += 1
                    proc.wait(timeout=60)
                    mid_write += attempt % 2 == 0 and any(out.glob(f".ckpt-*.tmp{proc.pid}"))
                    continue
            _, err = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err[-3000:]
        if (out / "summary.json").exists():
            break
    assert kills >= 3 and mid_write >= 1, (kills, mid_write)
    assert _rows(out) == _rows(tmp_path / "ref")
    a = ckpt_io.load_file(tmp_path / "ref" / "ckpt.pt")
    b = ckpt_io.load_file(out / "ckpt.pt")
    assert a["step"] == b["step"] == 10
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for k, v in a["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(b["optimizer"]["state"][k][name])), (k, name)
    la, lb = a["ranks"][0]["loss_fn"], b["ranks"][0]["loss_fn"]
    assert la["call"] == lb["call"] == 10
    assert torch.equal(la["strategy_state"]["buffer"], lb["strategy_state"]["buffer"])


@pytest.mark.slow
def test_torchrun_failed_save_fails_every_rank_and_world_size_change_is_refused(tmp_path):
    out = tmp_path / "ddp"
    (out / "ckpt-0000004.pt").mkdir(parents=True)  # rank 0's second save cannot replace a folder
    argv = ["train", "--device", "cpu", "--model", "unet-tiny", "--strategy", "speed", "--steps", "4",
            "--batch-size", "8", "--log-every", "1", "--ckpt-every", "2", "--sample-n", "0", "--no-progress",
            "--out", str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "speed_train.cli", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    text = r.stdout + r.stderr
    assert r.returncode != 0
    lines = [ln for ln in text.splitlines() if "error: checkpoint save failed at step 4" in ln]
    assert len(lines) == 2, text[-4000:]  # both ranks, the same message
    assert lines[0].split("error:", 1)[1] == lines[1].split("error:", 1)[1]
    assert [s for s, _ in ckpt_io.checkpoint_files(out)] == [2]
    st = ckpt_io.load_file(out / "ckpt-0000002.pt")
    assert st["world_size"] == 2 and len(st["ranks"]) == 2
    # the 2-rank checkpoint on 1 process: refused, naming both world sizes
    with pytest.raises(ValueError, match="written by 2 rank\\(s\\), this run has 1: resuming on another world size "
                                         "is refused"):
        _trainer(argv + ["--resume"])
