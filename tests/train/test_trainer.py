"""The trainer: loss goes down, exact resume, torchrun on CPU, the train/sample CLI and its errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speed_train.trainer import TrainConfig, Trainer, load_checkpoint_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models gain little from a second thread, and on a loaded machine OpenMP threads
    # that wait for each other make these tests many times slower; restore afterwards
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(tmp_path, **kw):
    base = dict(data="digits", model="unet-tiny", batch_size=16, steps=12, log_every=1, ckpt_every=0,
                sample_n=10, sample_steps=4, sampler="ddim", progress=False, out=str(tmp_path / "run"),
                device="cpu", ema=0.9)
    base.update(kw)
    return TrainConfig(**base)


def _losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_short_run_loss_goes_down_and_writes_everything(tmp_path):
    cfg = _cfg(tmp_path, steps=40, batch_size=32, log_every=10, strategy="speed")
    calls = []

    def eval_fn(trainer, step):
        calls.append(step)
        x = trainer.sample(10, steps=3)
        torch.rand(5)  # global RNG use inside eval must not change the run
        return {"sample_mean": float(x.mean())}

    s = Trainer(cfg).run(eval_fn=eval_fn, eval_every=20)
    losses = list(_losses(cfg.out).values())
    assert len(losses) == 4
    assert losses[-1] < 0.6 * losses[0], losses
    assert s["steps"] == 40 and s["steps_per_s"] > 0 and calls == [20, 40]
    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm"} <= set(rows[0]) and "sample_mean" in rows[1] and "sample_mean" in rows[3]
    run = json.loads((Path(cfg.out) / "run.json").read_text())
    assert run["config"]["strategy"] == "speed" and "torch" in run["versions"] and "->" in run["backend"]
    for f in ("samples.png", "loss.png", "ckpt.pt", "summary.json"):
        assert (Path(cfg.out) / f).exists(), f
    # the checkpoint rebuilds the model for sampling
    model, sched, info = load_checkpoint_model(Path(cfg.out) / "ckpt.pt")
    assert info["step"] == 40 and model.num_classes == 10 and sched.T == 1000


@pytest.mark.parametrize("strategy,model,extra", [
    ("speed", "unet-tiny", dict(flip=True)),
    ("importance", "DiT-tiny", dict(learn_sigma=True, lr=3e-4)),
    # the learned strategies: gradvar's device-side table (warmed up inside the run), uncertainty's
    # u trained by the optimizer (its group's moments are in the checkpoint)
    ("gradvar", "unet-tiny", dict(strategy_params=dict(warmup_steps=3, ema_steps=2.0))),
    ("speed+uncertainty", "DiT-tiny", dict(learn_sigma=True, lr=3e-4)),
])
def test_resume_gives_identical_per_step_losses(tmp_path, strategy, model, extra):
    straight = _cfg(tmp_path / "a", strategy=strategy, model=model, **extra)
    Trainer(straight).run()
    half = _cfg(tmp_path / "b", strategy=strategy, model=model, steps=6, **extra)
    Trainer(half).run()
    # a crashed future (lines after the checkpoint) must be dropped on resume
    with open(Path(half.out) / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 7, "loss": 123.0}) + "\n")
    resumed = _cfg(tmp_path / "b", strategy=strategy, model=model, resume=True, **extra)
    tr = Trainer(resumed)
    assert tr.step == 6
    tr.run()
    a, b = _losses(straight.out), _losses(half.out)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert [a[k] for k in sorted(a)] == [b[k] for k in sorted(b)]  # bit-identical
    sa = torch.load(Path(straight.out) / "ckpt.pt", weights_only=True)
    sb = torch.load(Path(half.out) / "ckpt.pt", weights_only=True)
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
        assert torch.equal(sa["ema"][k], sb["ema"][k]), k
    assert sa["ranks"][0]["loss_fn"]["call"] == sb["ranks"][0]["loss_fn"]["call"] == 12
    st_a, st_b = sa["ranks"][0]["loss_fn"]["strategy_state"], sb["ranks"][0]["loss_fn"]["strategy_state"]
    _assert_same_state(st_a, st_b)  # the strategy's learned state too, bit for bit


def _assert_same_state(a, b, path="strategy_state"):
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(_cfg(tmp_path, resume=True))


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "speed_train.cli", "train", "--device", "cpu", "--model", "unet-tiny", "--strategy", "importance",
           "--steps", "4", "--batch-size", "16", "--log-every", "1", "--sample-n", "10", "--sample-steps", "3",
           "--no-progress", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.count("trained ") == 1  # rank 0 reports
    assert sorted(_losses(out)) == [1, 2, 3, 4]
    st = torch.load(out / "ckpt.pt", weights_only=True)
    assert st["world_size"] == 2 and len(st["ranks"]) == 2
    r0, r1 = (rk["loss_fn"] for rk in st["ranks"])
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["call"] == r1["call"] == 4
    # the importance history was fed every rank's losses: 2 ranks x 8 samples x 4 steps
    counts = [rk["loss_fn"]["strategy_state"] for rk in st["ranks"]]
    assert _history_size(counts[0]) == _history_size(counts[1]) == 64
    assert (out / "samples.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("strategy,params", [
    # gradvar: every rank fed the gathered (t, loss) pairs, warmed up inside the run so its table moves
    ("gradvar", ["--param", "warmup_steps=1", "--param", "ema_steps=2"]),
    # uncertainty's u: trained by the optimizer, its gradient averaged over ranks outside DDP
    ("speed+uncertainty", []),
])
def test_torchrun_learned_strategy_state_is_the_same_on_every_rank(tmp_path, strategy, params):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "speed_train.cli", "train", "--device", "cpu", "--model", "unet-tiny", "--strategy", strategy,
           *params, "--steps", "5", "--batch-size", "16", "--log-every", "1", "--sample-n", "0",
           "--no-progress", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    st = torch.load(out / "ckpt.pt", weights_only=True)
    assert st["world_size"] == 2 and len(st["ranks"]) == 2
    s0, s1 = (rk["loss_fn"]["strategy_state"] for rk in st["ranks"])
    _assert_same_state(s0, s1)  # bit for bit: the ranks draw from one table
    # and the state has learned something (not the initial table on both ranks)
    learned = s0.get("m", s0.get("u"))
    if learned is None:  # a combined strategy keeps its parts' states
        learned = next(v for part in s0.values() if isinstance(part, dict) for k, v in part.items() if k in ("m", "u"))
    assert torch.as_tensor(learned).abs().sum() > 0


def _history_size(state):
    for key in ("count", "counts", "_state_count"):
        if key in state:
            return int(torch.as_tensor(state[key]).sum())
    raise AssertionError(f"no history counts in importance state {sorted(state)}")


# ----------------------------------------------------------------------------- CLI


def _cli(argv):
    from speed_train.cli import main

    return main(argv)


@pytest.mark.parametrize("argv,msg", [
    (["train", "--data", "/no/such/dir"], "not found"),
    (["train", "--strategy", "nope"], "unknown strategy 'nope'"),
    (["train", "--model", "DiT-Q/2"], "unknown model 'DiT-Q/2'; known models: DiT-S/2"),
    (["train", "--param", "k"], "key=value"),
    (["train", "--strategy", "speed", "--param", "kk=5"], "no parameter kk"),
    (["train", "--data", "fashion-mnist"], "apt-get install dataset-fashion-mnist"),
    (["sample", "--ckpt", "/no/such/ckpt.pt"], "no checkpoint"),
])
def test_cli_errors(argv, msg, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SPEED_FASHION_MNIST_DIR", str(tmp_path))
    assert _cli(argv + (["--out", str(tmp_path / "o")] if argv[0] == "train" else [])) == 2
    err = capsys.readouterr().err
    assert msg in err, err
    assert not (tmp_path / "o").exists()


def test_cli_train_then_sample(tmp_path, capsys):
    out = tmp_path / "r"
    rc = _cli(["train", "--steps", "3", "--batch-size", "8", "--out", str(out), "--no-progress",
               "--sample-n", "4", "--sample-steps", "3", "--param", "k=2", "--log-every", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "steps/s" in text and str(out / "samples.png") in text
    assert json.loads((out / "run.json").read_text())["config"]["strategy_params"] == {"k": 2}
    grid = tmp_path / "g.png"
    assert _cli(["sample", "--ckpt", str(out / "ckpt.pt"), "--n", "5", "--steps", "4", "--out", str(grid),
                 "--npz", str(tmp_path / "s.npz"), "--sampler", "ddpm"]) == 0
    import numpy as np

    z = np.load(tmp_path / "s.npz")
    assert grid.exists() and z["x"].shape == (5, 1, 8, 8) and z["y"].tolist() == [0, 1, 2, 3, 4]
    assert _cli(["sample", "--ckpt", str(out / "ckpt.pt"), "--class", "11", "--out", str(grid)]) == 2
