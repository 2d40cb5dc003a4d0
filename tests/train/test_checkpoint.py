"""Checkpoints (atomic, rotating, weights-only, fallback), resume that is exact or refused,
config validation and non-finite losses: in-process, tiny model, a few steps each."""
import errno
import json
import math
from pathlib import Path

import pytest
import torch

from speed_train import checkpoint as ckpt_io
from speed_train.trainer import NonFiniteError, TrainConfig, Trainer, validate_config


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(out, **kw):
    base = dict(data="digits", model="unet-tiny", batch_size=8, steps=6, log_every=1, ckpt_every=2, sample_n=0,
                progress=False, out=str(out), device="cpu", ema=0.9, strategy="importance")
    base.update(kw)
    return TrainConfig(**base)


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (shared by the resume-refusal tests)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    Trainer(_cfg(out, steps=4)).run()
    torch.set_num_threads(n)
    return out


# ----------------------------------------------------------------------------- files


def test_rotation_keeps_last_n_and_loads_weights_only(tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg(out, steps=8, keep_ckpts=3)).run()
    assert [s for s, _ in ckpt_io.checkpoint_files(out)] == [8, 6, 4]
    latest = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)  # no pickled code needed
    newest = torch.load(out / "ckpt-0000008.pt", map_location="cpu", weights_only=True)
    assert latest["step"] == newest["step"] == 8
    assert (out / "ckpt.pt").stat().st_ino == (out / "ckpt-0000008.pt").stat().st_ino  # a link, not a copy
    for k in newest["model"]:
        assert torch.equal(latest["model"][k], newest["model"][k])
    assert not list(out.glob(".*tmp*"))
    # a file holding pickled code is refused by weights_only loading, named in one line
    evil = tmp_path / "evil.pt"
    torch.save({"format": "speed_train/1", "x": Path("/")}, evil)
    with pytest.raises(ckpt_io.CheckpointError, match=f"checkpoint {evil} is unreadable") as ei:
        ckpt_io.load_file(evil)
    assert "\n" not in str(ei.value)


def test_a_fresh_run_replaces_an_earlier_runs_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(_cfg(out, steps=6)).run()
    Trainer(_cfg(out, steps=2, strategy="speed")).run()
    assert [s for s, _ in ckpt_io.checkpoint_files(out)] == [2]  # no step-6 file of the other run left
    assert "removing the checkpoints of an earlier run" in capsys.readouterr().err


def test_unreadable_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    straight = tmp_path / "a"
    Trainer(_cfg(straight)).run()
    out = tmp_path / "b"
    Trainer(_cfg(out, steps=4)).run()
    bad = out / "ckpt-0000004.pt"
    data = bad.read_bytes()
    (out / "ckpt.pt").unlink()
    bad.write_bytes(data[: len(data) // 2])  # truncated
    capsys.readouterr()
    tr = Trainer(_cfg(out, resume=True))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"checkpoint {bad} is unreadable" in err[0], err
    assert f"falling back to {out / 'ckpt-0000002.pt'}" in err[0]
    assert tr.step == 2 and tr.resume_file == out / "ckpt-0000002.pt"
    tr.run()  # and the continuation is exact
    a, b = _rows(straight), _rows(out)
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in a] == [(r["step"], r["loss"], r["grad_norm"]) for r in b]
    assert [s for s, _ in ckpt_io.checkpoint_files(out)] == [6, 4]  # the bad step-4 file was rewritten
    # garbage in the newest (and in ckpt.pt, its link): back to step 4
    (out / "ckpt-0000006.pt").write_bytes(b"\x00not a checkpoint\xff" * 100)
    capsys.readouterr()
    tr = Trainer(_cfg(out, resume=True))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"checkpoint {out / 'ckpt-0000006.pt'} is unreadable" in err[0] and tr.step == 4
    # the same file named explicitly: no silent fallback, one line naming it
    with pytest.raises(ckpt_io.CheckpointError, match=f"checkpoint {out / 'ckpt.pt'} is unreadable"):
        Trainer(_cfg(out, resume=str(out / "ckpt.pt")))
    # nothing readable at all
    for _, p in ckpt_io.checkpoint_files(out):
        p.write_bytes(b"x")
    with pytest.raises(ckpt_io.CheckpointError, match="no readable checkpoint"):
        Trainer(_cfg(out, resume=True))


def test_a_write_that_fails_with_enospc_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    tr = Trainer(_cfg(out, steps=6))
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if tr.step >= 4:  # the second save: write part of it, then the disk is full
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_io.torch, "save", full_disk)
    with pytest.raises(ckpt_io.CheckpointError, match="checkpoint save failed at step 4") as ei:
        tr.run()
    assert "No space left on device" in str(ei.value) and "ckpt-0000002.pt" in str(ei.value)
    monkeypatch.undo()
    assert [s for s, _ in ckpt_io.checkpoint_files(out)] == [2]
    assert not list(out.glob(".*tmp*"))  # the partial temp file is gone
    assert ckpt_io.load_file(out / "ckpt.pt")["step"] == 2
    tr2 = Trainer(_cfg(out, steps=6, resume=True))
    assert tr2.step == 2


# ----------------------------------------------------------------------------- resume: exact or refused


@pytest.mark.parametrize("change", [
    dict(strategy="speed"), dict(strategy_params={"uniform_prob": 0.5}), dict(prediction="v"),
    dict(schedule="cosine"), dict(T=500), dict(seed=1), dict(batch_size=16), dict(lr=5e-4), dict(ema=0.5),
    dict(grad_clip=None), dict(learn_sigma=True), dict(class_cond=False), dict(weight_decay=0.1),
    dict(warmup_steps=3), dict(model="DiT-tiny"), dict(class_dropout=0.2), dict(backend="torch"),
])
def test_each_changed_setting_on_resume_is_refused(trained, change):
    key = next(iter(change))
    with pytest.raises(ValueError, match=f"settings differ from the checkpoint's \\(.*{key}: checkpoint"):
        Trainer(_cfg(trained, resume=True, **change))


def test_refusal_lists_every_difference_and_override_allows_chosen_ones(trained, tmp_path):
    with pytest.raises(ValueError) as ei:
        Trainer(_cfg(trained, resume=True, lr=5e-4, seed=3))
    assert "lr: checkpoint 0.001, now 0.0005" in str(ei.value) and "seed: checkpoint 0, now 3" in str(ei.value)
    with pytest.raises(ValueError, match="--override strategy: the checkpoint's model or state depends on"):
        Trainer(_cfg(trained, resume=True, strategy="speed", overrides=["strategy"]))
    with pytest.raises(ValueError, match="--override nope: no such setting"):
        Trainer(_cfg(trained, resume=True, overrides=["nope"]))
    # run-control settings may change freely (more steps, other intervals)
    tr = Trainer(_cfg(trained, resume=True, lr=5e-4, overrides=["lr"], steps=5, log_every=5, ckpt_every=0))
    assert tr.cfg.lr == 5e-4 and tr.step == 4
    tr.run()
    run = json.loads((Path(trained) / "run.json").read_text())
    assert run["overrides"] == {"lr": {"checkpoint": 0.001, "now": 0.0005}}
    assert run["config"]["lr"] == 5e-4 and run["resumed_from_step"] == 4


def test_cli_resume_takes_the_checkpoints_settings(tmp_path, capsys):
    from speed_train.cli import main

    out = tmp_path / "run"
    base = ["train", "--out", str(out), "--no-progress", "--sample-n", "0", "--threads", "1", "--log-every", "1"]
    assert main(base + ["--steps", "2", "--batch-size", "8", "--strategy", "uniform", "--lr", "2e-3",
                        "--grad-clip", "0"]) == 0
    # no strategy / batch / lr / grad-clip flags: the checkpoint's hold (not the defaults)
    assert main(base + ["--resume", "--steps", "3"]) == 0
    cfg = json.loads((out / "run.json").read_text())["config"]
    assert (cfg["strategy"], cfg["batch_size"], cfg["lr"], cfg["grad_clip"], cfg["steps"]) == ("uniform", 8, 2e-3,
                                                                                                   None, 3)
    capsys.readouterr()
    assert main(base + ["--resume", "--steps", "4", "--strategy", "speed", "--batch-size", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch_size: checkpoint 8, now 16" in err[0] and "strategy: checkpoint 'uniform'" in err[0]


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("field,value", [
    ("steps", 0), ("steps", -3), ("steps", 2.5), ("batch_size", 0), ("batch_size", -8), ("ema", 1.0), ("ema", -0.1),
    ("ema", float("nan")), ("grad_clip", -1.0), ("grad_clip", float("inf")), ("lr", 0.0), ("lr", -1e-3),
    ("lr", float("nan")), ("warmup_steps", -1), ("T", 1), ("T", 0), ("log_every", -1), ("ckpt_every", -2),
    ("sample_every", -1), ("sample_n", -1), ("sample_steps", 0), ("weight_decay", -0.1), ("class_dropout", 1.0),
    ("keep_ckpts", 0), ("skip_nonfinite", -1), ("threads", 0), ("image_size", 0), ("seed", -1),
    ("guidance", float("nan")), ("sampler", "euler"), ("prediction", "score"), ("steps", True),
])
def test_each_bad_setting_is_a_clear_error(field, value):
    flag = "--" + field.replace("_", "-")
    with pytest.raises(ValueError, match=f"^{flag} must be"):
        validate_config(TrainConfig(**{field: value}))


def test_zero_or_unset_grad_clip_means_off():
    for off in (0, 0.0, None):
        validate_config(TrainConfig(grad_clip=off))
        assert TrainConfig(grad_clip=off).resolved("digits", False).grad_clip is None


# ----------------------------------------------------------------------------- non-finite losses


def _inject_nan(trainer, steps):
    """Make the loss NaN at the given (1-based) steps."""
    real = trainer.loss_fn.loss

    def loss(*a, **k):
        out = real(*a, **k)
        return out * float("nan") if trainer.step + 1 in steps else out

    trainer.loss_fn.loss = loss


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    tr = Trainer(_cfg(out, steps=8))
    _inject_nan(tr, {5})
    with pytest.raises(NonFiniteError, match=f"non-finite loss or gradient norm at step 5 .*the last good checkpoint "
                                             f"is {out / 'ckpt-0000004.pt'}"):
        tr.run()
    assert [s for s, _ in ckpt_io.checkpoint_files(out)] == [4, 2]
    assert max(r["step"] for r in _rows(out)) == 4
    good = ckpt_io.load_file(out / "ckpt.pt")
    assert good["step"] == 4 and all(torch.isfinite(v).all() for v in good["model"].values())


def test_deferred_device_side_check_names_the_step_and_writes_nothing_after_it(tmp_path):
    # the CUDA path (no per-step sync), forced on CPU: found at the next side step
    out = tmp_path / "run"
    tr = Trainer(_cfg(out, steps=8, log_every=4, ckpt_every=4, strategy="speed"))
    tr._check_every_step = False
    _inject_nan(tr, {6})
    with pytest.raises(NonFiniteError, match="at step 6: .*ckpt-0000004.pt"):
        tr.run()
    assert [s for s, _ in ckpt_io.checkpoint_files(out)] == [4]
    assert [r["step"] for r in _rows(out)] == [4]


def test_skip_nonfinite_skips_counts_and_then_stops(tmp_path):
    out = tmp_path / "run"
    tr = Trainer(_cfg(out, steps=6, skip_nonfinite=2))
    _inject_nan(tr, {2, 5})
    s = tr.run()
    rows = _rows(out)
    assert [r["nonfinite_skipped"] for r in rows] == [0, 1, 1, 1, 2, 2]
    assert rows[1]["loss"] is None and all(math.isfinite(r["loss"]) for r in rows if r["step"] not in (2, 5))
    assert s["nonfinite_skipped"] == 2
    st = ckpt_io.load_file(out / "ckpt.pt")
    assert st["skipped_nonfinite"] == 2 and all(torch.isfinite(v).all() for v in st["model"].values())
    tr = Trainer(_cfg(tmp_path / "r2", steps=6, skip_nonfinite=1))
    _inject_nan(tr, {2, 3})
    with pytest.raises(NonFiniteError, match="at step 3 .*after skipping 1 such step"):
        tr.run()
