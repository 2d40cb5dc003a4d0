"""Smoke test of benchmarks/bench_train.py: a few whole training steps of a tiny model on each
side (plain PyTorch, ours), the result table written, both sides training the same model."""
from __future__ import annotations

import csv
import importlib.util
import math
import os

import pytest
import torch

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_train.py")


def _load():
    spec = importlib.util.spec_from_file_location("bench_train", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load()


def test_smoke_writes_table_and_both_sides_train_the_same_model(bench, tmp_path):
    threads = torch.get_num_threads()
    try:
        rows = bench.main(["--device", "cpu", "--smoke", "--models", "DiT-tiny", "--batch", "4", "--repeats", "2",
                           "--steps-per-repeat", "1", "--warmup", "1", "--out", str(tmp_path), "--tag", "t"])
    finally:
        torch.set_num_threads(threads)
    md, csv_path = tmp_path / "train_cpu_t.md", tmp_path / "train_cpu_t.csv"
    assert md.exists() and csv_path.exists()
    with open(csv_path) as f:
        got = list(csv.DictReader(f))
    assert [r["impl"] for r in got] == ["plain", "ours"]
    plain, ours = got
    assert plain["status"] == ours["status"] == "ok"
    assert int(plain["params"]) == int(ours["params"]) > 0
    assert plain["out_channels"] == ours["out_channels"] == "8"  # learned sigma: 2C outputs
    assert ours["backend"] == rows[1]["backend"] != ""
    for r in got:
        assert math.isfinite(float(r["final_loss"])) and float(r["final_loss"]) > 0
        assert float(r["ms_median"]) > 0 and float(r["images_per_s"]) > 0
    text = md.read_text()
    assert "| DiT-tiny | 4x8x8 | 4 | eager |" in text
    assert "command: `python benchmarks/bench_train.py --device cpu --smoke" in text
    assert "torch " + torch.__version__ in text


@pytest.mark.parametrize("impl", ["plain", "ours"])
def test_one_step_updates_weights_and_ema(bench, impl):
    spec = bench.SMOKE["unet-tiny"][:3] + (2,) + bench.SMOKE["unet-tiny"][4:]
    torch.manual_seed(0)
    base = bench.build_model(spec[0], in_channels=spec[1], image_size=spec[2], num_classes=spec[5],
                             learn_sigma=spec[4])
    side = bench.Side(impl, base, spec, torch.device("cpu"), "eager", None, seed=3)
    before = [p.detach().clone() for p in side.params]
    ema_before = [e.clone() for e in side.ema]
    side.step()
    moved = sum(not torch.equal(a, p) for a, p in zip(before, side.params))
    assert moved > 0, "AdamW changed no parameter"
    # EMA moved towards the new weights by (1 - decay) of the gap
    for e0, e, p in zip(ema_before, side.ema, side.params):
        torch.testing.assert_close(e, e0 + (1 - bench.EMA_DECAY) * (p.detach() - e0))
    assert torch.isfinite(side.last_loss)


def test_bad_arguments_are_refused(bench, tmp_path):
    with pytest.raises(ValueError, match="--models"):
        bench.main(["--device", "cpu", "--models", "nope", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--modes"):
        bench.main(["--device", "cpu", "--smoke", "--modes", "fast", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="graph"):
        bench.main(["--device", "cpu", "--smoke", "--modes", "graph", "--out", str(tmp_path)])


def test_training_recipe_channels_last_keeps_the_function():
    from speed_train.models import apply_training_recipe, build_model

    torch.manual_seed(0)
    model = build_model("unet-tiny", in_channels=3, image_size=16)
    for p in model.parameters():  # the zero-initialised convs would hide a layout mistake
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    want = model(x, t)
    out = apply_training_recipe(model, "cpu", channels_last=True)
    assert out.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not out.conv_in.weight.is_contiguous()
    torch.testing.assert_close(out(x, t), want, rtol=1e-4, atol=1e-5)
