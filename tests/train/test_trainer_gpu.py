"""The trainer on CUDA: bf16 autocast, learned sigma, sampling, resume, torch.compile (skipped without a GPU)."""
import json
from pathlib import Path

import pytest
import torch

from speed_train.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.gpu


def _cfg(out, **kw):
    base = dict(data="digits", model="DiT-tiny", batch_size=64, steps=40, log_every=1, ckpt_every=0, sample_n=20,
                sample_steps=10, sampler="ddpm", progress=False, out=str(out), device="cuda", ema=0.9,
                learn_sigma=True, lr=3e-4)
    base.update(kw)
    return TrainConfig(**base)


def _losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_cuda_bf16_run_and_resume(tmp_path):
    straight = Trainer(_cfg(tmp_path / "a"))
    assert straight.amp_dtype == torch.bfloat16 and straight.device.type == "cuda"
    s = straight.run()
    a = _losses(tmp_path / "a")
    assert len(a) == 40 and all(map(lambda v: v == v, a)) and sum(a[-5:]) < sum(a[:5])
    x = straight.sample(8, steps=5)
    assert x.is_cuda and torch.isfinite(x).all() and x.abs().max() <= 1
    assert "cuda" in json.loads((tmp_path / "a" / "run.json").read_text())["device"]
    Trainer(_cfg(tmp_path / "b", steps=20)).run()
    Trainer(_cfg(tmp_path / "b", resume=True)).run()
    b = _losses(tmp_path / "b")
    # same stream; GPU kernels (attention backward, cuBLAS) need not be bitwise deterministic
    assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=2e-2), (a, b)
    print("cuda resume bit-identical:", a == b, "steps/s", s["steps_per_s"])


def test_cuda_compile_unet(tmp_path):
    s = Trainer(_cfg(tmp_path / "c", model="unet-tiny", learn_sigma=False, compile=True, steps=15, lr=1e-3)).run()
    a = _losses(tmp_path / "c")
    assert len(a) == 15 and sum(a[-3:]) < sum(a[:3]) and s["samples"]
