"""The `speed-kernels` command (speed_train.cli): one KEY=VALUE parser checked against the
strategies' signatures, user errors as one line with exit status 2, the layering (speed_kernels
never imports speed_train), and the backend line and SPEED_* knobs in run.json / summary.json."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speed_kernels.analysis import parse_params, parse_strategy_spec
from speed_train.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_one_parser_routes_params_by_signature():
    got = parse_params(["k=5", "speed:lam=0.6", "gamma=0.5", "mirror=false"], ["uniform", "speed", "p2", "min-snr"])
    assert got == {"uniform": {}, "speed": {"k": 5, "lam": 0.6, "mirror": False}, "p2": {"k": 5, "gamma": 0.5},
                   "min-snr": {"gamma": 0.5}}
    assert parse_strategy_spec("speed:k=5,tau=none,variant=paper") == ("speed", {"k": 5, "tau": None,
                                                                                 "variant": "paper"})
    with pytest.raises(ValueError, match="no parameter zz in the chosen strategies; parameters of uniform: "
                                         r"\(none\); speed: k, lam"):
        parse_params(["zz=1"], ["uniform", "speed"])
    with pytest.raises(ValueError, match="strategy 'uniform' has no parameter k"):
        parse_params(["uniform:k=1"], ["uniform", "speed"])
    with pytest.raises(ValueError, match="names strategy 'p2', which is not among"):
        parse_params(["p2:gamma=1"], ["speed"])
    with pytest.raises(ValueError, match="key=value"):
        parse_params(["k"], ["speed"])
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        parse_params([], ["nope"])


def test_analyze_param_goes_only_to_strategies_that_accept_it(capsys):
    assert main(["analyze", "--param", "k=2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [(s["name"], s["params"].get("k")) for s in d["strategies"]] == [("uniform", None), ("speed", 2)]


@pytest.mark.parametrize("argv,msg", [
    (["analyze", "--strategy", "clts:ramp_steps=0.5"], "ramp_steps must be >= 1"),
    (["analyze", "--strategy", "clts:ramp_steps=2.5"], "ramp_steps must be a whole number >= 1"),
    (["analyze", "--param", "zz=1"], "no parameter zz"),
    (["analyze", "--T", "1"], None),
    (["train", "--strategy", "clts:ramp_steps=0.5"], "ramp_steps must be >= 1"),
    (["train", "--grad-clip", "-1"], "--grad-clip must be a finite number > 0"),
    (["train", "--steps", "0"], "--steps must be an integer >= 1"),
    (["train", "--batch-size", "-4"], "--batch-size must be an integer >= 1"),
    (["train", "--ema", "1"], "--ema must be a finite number >= 0 and < 1"),
    (["train", "--lr", "0"], "--lr must be a finite number > 0"),
    (["train", "--warmup-steps", "-1"], "--warmup-steps must be"),
    (["train", "--T", "1"], "--T must be an integer >= 2"),
    (["train", "--log-every", "-1"], "--log-every must be"),
    (["train", "--override", "model", "--resume"], "--override model: the checkpoint's model or state depends"),
    (["train", "--resume"], "no checkpoint in"),
    (["train", "--steps", "many"], "invalid int value: 'many'"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["compare", "--strategies", "uniform,clts:ramp_steps=0.5"], "ramp_steps must be >= 1"),
    (["compare", "--strategies", "uniform", "--param", "k=5"], "no parameter k"),
    (["sample", "--ckpt", "/no/such/ckpt.pt"], "no checkpoint at /no/such/ckpt.pt"),
])
def test_user_errors_exit_2_with_one_line(argv, msg, tmp_path, capsys):
    if argv[0] in ("train", "compare"):
        argv = argv + ["--out", str(tmp_path / "o")]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("speed-kernels"), lines
    if msg:
        assert msg in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_a_runtime_error_in_a_subprocess_is_one_line_and_status_2(tmp_path):
    # end to end through `python -m speed_train.cli`: a corrupt checkpoint, no traceback
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"not a checkpoint")
    r = subprocess.run([sys.executable, "-m", "speed_train.cli", "sample", "--ckpt", str(bad)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == (
        f"speed-kernels sample: error: checkpoint {bad} is unreadable (UnpicklingError: "
        + r.stderr.split("UnpicklingError: ", 1)[1].strip()), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_library_never_imports_the_application():
    code = ("import sys, speed_kernels, speed_kernels.cli, speed_kernels.analysis, speed_kernels.strategies, "
            "speed_kernels.backends, speed_kernels.loss\n"
            "assert not [m for m in sys.modules if m.startswith('speed_train')], 'speed_train imported'\n"
            "sys.exit(speed_kernels.cli.main(['analyze', '--json']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["areas"]["tau"] == 700
    for py in (ROOT / "speed_kernels").rglob("*.py"):
        for line in py.read_text().splitlines():
            s = line.strip()
            assert not (s.startswith(("import speed_train", "from speed_train"))), (py, line)
    setup = (ROOT / "setup.py").read_text()
    assert '"speed-kernels=speed_train.cli:main"' in setup


def test_train_reports_backend_and_speed_env(tmp_path, capsys, monkeypatch):
    from speed_kernels.backends import numerics_env

    monkeypatch.setenv("SPEED_KERNELS_TEST_KNOB", "7")
    monkeypatch.setenv("NOT_SPEED_X", "1")
    assert numerics_env()["SPEED_KERNELS_TEST_KNOB"] == "7" and "NOT_SPEED_X" not in numerics_env()
    out = tmp_path / "r"
    assert main(["train", "--steps", "1", "--batch-size", "4", "--out", str(out), "--no-progress", "--sample-n", "0",
                 "--backend", "torch", "--threads", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "loss backend: torch (requested on cpu)"
    assert sum(line.startswith("loss backend:") for line in printed) == 1
    for name in ("run.json", "summary.json"):
        d = json.loads((out / name).read_text())
        info = d["backend_info"] if name == "run.json" else d["backend"]
        assert info == {"requested": "torch", "resolved": "torch", "reason": "requested on cpu"}
        assert d["numerics_env"]["SPEED_KERNELS_TEST_KNOB"] == "7" and "NOT_SPEED_X" not in d["numerics_env"]


def test_auto_backend_reason_names_what_was_passed_over(tmp_path, monkeypatch):
    import speed_kernels.backends as B
    from speed_train.trainer import TrainConfig, Trainer

    monkeypatch.setitem(B._LOAD_ERRORS, "cpp", "ImportError: _C is not built")
    monkeypatch.delitem(B._REGISTRY, "cpp", raising=False)
    tr = Trainer(TrainConfig(steps=1, batch_size=4, out=str(tmp_path / "r"), device="cpu", progress=False))
    assert tr.backend_info["resolved"] == "torch-fast"
    assert tr.backend_info["reason"] == "auto on cpu: no kernel backend (cpp: ImportError: _C is not built)"


def test_adapters_take_the_rank_from_torch_distributed(monkeypatch):
    import torch.distributed as dist

    from speed_kernels import NoiseSchedule
    from speed_train.adapters import SpeeDDiffusion

    s = NoiseSchedule.linear(1000)
    assert SpeeDDiffusion(s).loss_fn.rank == 0  # no process group
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 3)
    d3, d0 = SpeeDDiffusion(s), SpeeDDiffusion(s, rank=0)
    assert d3.loss_fn.rank == 3 and d0.loss_fn.rank == 0
    t3, t0 = d3.sample_timesteps(64), d0.sample_timesteps(64)
    assert not torch.equal(t3, t0)  # another rank, another stream
    with pytest.raises(ValueError, match="rank must be"):
        SpeeDDiffusion(s, rank=-1)
