"""`compare`: strategy-list parsing, the speed-up reading, and a tiny end-to-end run."""
import json
import math
import os

import pytest

from speed_train.compare import first_reach_step, parse_strategies, speedup


def test_parse_strategies_with_parameters_and_combinations():
    got = parse_strategies("uniform,speed:k=5,lam=0.6,p2:gamma=0.5, speed+p2 ,min-snr")
    assert got == [
        ("uniform", "uniform", {}),
        ("speed:k=5,lam=0.6", "speed", {"k": 5, "lam": 0.6}),
        ("p2:gamma=0.5", "p2", {"gamma": 0.5}),
        ("speed+p2", "speed+p2", {}),
        ("min-snr", "min-snr", {}),
    ]
    assert parse_strategies("speed:variant=paper")[0][2] == {"variant": "paper"}


@pytest.mark.parametrize(
    "spec, match",
    [
        ("uniform,nope", "unknown strategy 'nope'"),
        ("speed:kk=5", "no parameter kk"),
        ("k=5,speed", "before any strategy"),
        ("uniform,uniform", "twice"),
        ("", "empty"),
        ("speed:k", "key=value"),
    ],
)
def test_parse_strategies_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_strategies(spec)


def test_first_reach_step_interpolates():
    steps = [100, 200, 300, 400]
    assert first_reach_step(steps, [10, 8, 6, 5], 5) == (400.0, True)
    assert first_reach_step(steps, [9, 6, 4, 3], 5) == (250.0, True)
    assert first_reach_step(steps, [9, 6, 6, 6], 5) == (None, True)
    assert first_reach_step(steps, [4, 6, 4, 3], 5) == (100.0, False)  # upper bound: the first eval
    assert first_reach_step(steps, [float("nan"), 6, 4, 3], 5) == (250.0, True)


def test_speedup_reading():
    u = ([100, 200, 300, 400], [10, 8, 6, 5])
    r = speedup(u, ([100, 200, 300, 400], [9, 6, 4, 3]))
    assert r["target"] == 5 and r["uniform_steps"] == 400 and r["steps"] == 250
    assert r["speedup"] == pytest.approx(1.6) and r["bound"] is None
    assert speedup(u, u)["speedup"] == pytest.approx(1.0)
    assert speedup(u, ([100, 200, 300, 400], [12, 11, 10, 9]))["speedup"] is None
    first = speedup(u, ([100, 200, 300, 400], [4, 3, 3, 3]))
    assert first["speedup"] == pytest.approx(4.0) and first["bound"] == ">="
    # uniform non-monotone: its final score was first reached between two evaluations
    u2 = ([100, 200, 300, 400], [10, 4, 7, 6])
    r2 = speedup(u2, ([100, 200, 300, 400], [8, 7, 6, 5]))
    assert r2["uniform_steps"] == pytest.approx(100 + 100 * 4 / 6)
    assert r2["steps"] == 300 and r2["bound"] is None
    both = speedup(([100, 200], [5, 6]), ([100, 200], [4, 4]))
    assert both["bound"] == "?"


def res_env_ok(out):
    meta = json.loads((out / "results.json").read_text())["meta"]
    return meta["numerics_env"].get("SPEED_KERNELS_CACHE") == os.environ["SPEED_KERNELS_CACHE"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_compare_end_to_end_writes_table_csv_json_and_png(tmp_path, cache, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    monkeypatch.setenv("SPEED_KERNELS_CACHE", str(cache))
    from speed_train.cli import main

    out = tmp_path / "cmp"
    argv = [
        "compare", "--strategies", "uniform,speed:k=5,lam=0.6", "--steps", "8", "--eval-every", "4",
        "--eval-samples", "40", "--sample-steps", "3", "--batch-size", "16", "--model", "unet-tiny",
        "--device", "cpu", "--out", str(out), "--seeds", "0",
    ]
    rc = main(argv)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| strategy | final fd" in printed and "| speed:k=5,lam=0.6 |" in printed
    assert "real vs real (floor)" in printed
    for name in ("results.md", "results.csv", "results.json", "quality_vs_steps.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "quality_vs_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "produced by" in md and "versions" in md and "machine" in md and "date" in md
    assert "SPEED_* environment: {" in md and res_env_ok(out)
    assert "40 samples (ddim, 3 steps" in md
    csv_text = (out / "results.csv").read_text()
    assert csv_text.startswith("# produced by:") and "speed:k=5,lam=0.6" in csv_text
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["config"]["steps"] == 8 and res["meta"]["config"]["eval_samples"] == 40
    assert [r["strategy"] for r in res["rows"]] == ["uniform", "speed:k=5,lam=0.6"]
    for label, c in res["curves"].items():
        assert c["steps"] == [4, 8]
        assert all(math.isfinite(v) for v in c["fd_mean"])
    uni = res["rows"][0]
    assert uni["speedup"] == pytest.approx(1.0) or uni["speedup_bound"] == "?"
    # every evaluation is logged next to its sample count and sampler steps in the run's metrics.jsonl
    rows = [json.loads(line) for line in (out / "runs" / "uniform-seed0" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "q_fd" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert all(r["q_n_samples"] == 40 and r["q_sample_steps"] == 3 for r in evals)
    assert (out / "runs" / "uniform-seed0" / "eval_samples.png").is_file()
    assert not (out / "runs" / "uniform-seed0" / "ckpt.pt").exists()  # deleted unless --keep-checkpoints
    assert not list((out / "runs" / "uniform-seed0").glob("ckpt-*.pt"))

    # --reuse reads the runs back instead of training again; other settings train again
    assert main(argv + ["--reuse"]) == 0
    printed = capsys.readouterr().out
    assert "reusing uniform (seed 0)" in printed and "reusing speed:k=5,lam=0.6 (seed 0)" in printed
    assert "compare: training" not in printed
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == res["rows"]


def test_compare_cli_reports_bad_strategy(tmp_path, capsys):
    from speed_train.cli import main

    rc = main(["compare", "--strategies", "uniform,bogus", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "unknown strategy 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # failed before any work


# ---------------------------------------------------------------------------------- flow matching


def test_parse_strategies_flow_names_and_routed_params():
    got = parse_strategies("uniform,logit_normal:mean=0.5,mode,speed:k=3", ["shift=3", "speed:data_std=0.5"],
                           objective="flow")
    assert got == [
        ("uniform:shift=3", "uniform", {"shift": 3}),
        ("logit_normal:shift=3,mean=0.5", "logit_normal", {"shift": 3, "mean": 0.5}),
        ("mode:shift=3", "mode", {"shift": 3}),
        ("speed:shift=3,data_std=0.5,k=3", "speed", {"shift": 3, "data_std": 0.5, "k": 3}),
    ]
    # flow names are not DDPM names and vice versa: each objective checks its own registry
    with pytest.raises(ValueError, match="unknown flow strategy 'clts'"):
        parse_strategies("uniform,clts", objective="flow")
    with pytest.raises(ValueError, match="unknown strategy 'logit_normal'"):
        parse_strategies("uniform,logit_normal")
    with pytest.raises(ValueError, match="not accepted"):
        parse_strategies("uniform,mode:mean=1", objective="flow")
    with pytest.raises(ValueError, match="objective"):
        parse_strategies("uniform", objective="edm")


def test_compare_flow_reference_is_uniform_on_the_same_path():
    from speed_train.compare import _is_reference

    assert _is_reference("uniform", {"shift": 3}, "flow") and _is_reference("uniform", {}, "flow")
    assert not _is_reference("uniform", {"shift": 3}, "diffusion")
    assert not _is_reference("logit_normal", {}, "flow")


@pytest.mark.parametrize("kw, match", [({"sampler": "ddim"}, "euler or heun for objective flow"),
                                       ({"learn_sigma": True}, "learn_sigma")])
def test_compare_flow_rejects_diffusion_options(tmp_path, kw, match):
    from speed_train.compare import run_compare

    with pytest.raises(ValueError, match=match):
        run_compare("uniform,speed", objective="flow", out=tmp_path / "x", verbose=False, **kw)
    assert not (tmp_path / "x").exists()  # failed before any work


def test_compare_flow_end_to_end(tmp_path, cache, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    monkeypatch.setenv("SPEED_KERNELS_CACHE", str(cache))
    from speed_train.cli import main

    out = tmp_path / "flow"
    rc = main([
        "compare", "--objective", "flow", "--strategies", "uniform,speed", "--param", "shift=2",
        "--sampler", "heun", "--steps", "6", "--eval-every", "3", "--eval-samples", "32", "--sample-steps", "2",
        "--batch-size", "8", "--model", "unet-tiny", "--device", "cpu", "--out", str(out), "--seeds", "0",
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| uniform:shift=2 |" in printed and "| speed:shift=2 |" in printed
    md = (out / "results.md").read_text()
    assert "flow, sampler heun" in md and "objective flow" in md and "v-prediction" in md
    assert "32 samples (heun, 2 steps" in md
    assert "objective flow, v-prediction, sampler heun" in (out / "results.csv").read_text()
    res = json.loads((out / "results.json").read_text())
    cfg = res["meta"]["config"]
    assert cfg["objective"] == "flow" and cfg["sampler"] == "heun" and cfg["prediction"] == "v"
    assert res["reference"] == "uniform:shift=2"
    for label, c in res["curves"].items():
        assert c["steps"] == [3, 6] and all(math.isfinite(v) for v in c["fd_mean"])
    # each run trained the flow objective with its own flow strategy on the shifted path
    runs = res["runs"]
    assert runs["speed:shift=2"]["0"]["loss_fn"].startswith("FlowObjective(FlowMatchingLoss(FlowStrategy(speed(")
    assert "shift=2.0" in runs["uniform:shift=2"]["0"]["loss_fn"]
    run_cfg = json.loads((out / "runs" / "speed_shift_2-seed0" / "compare_run.json").read_text())["signature"]
    assert run_cfg["config"]["objective"] == "flow" and run_cfg["config"]["strategy"] == "speed"
    # the flow and diffusion losses differ: the speed run's final loss is not uniform's
    assert res["rows"][0]["final_loss"] != res["rows"][1]["final_loss"]
