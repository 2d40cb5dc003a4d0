"""benchmarks/regimes.py: sampler parsing, the paired bootstrap, and a tiny end-to-end slice."""
import csv
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("regimes", ROOT / "benchmarks" / "regimes.py")
regimes = importlib.util.module_from_spec(_spec)
sys.modules["regimes"] = regimes
_spec.loader.exec_module(regimes)


def test_parse_samplers():
    assert regimes.parse_samplers("ddpm-250,ddim-50") == [("ddpm", 250, False), ("ddim", 50, False)]
    assert regimes.parse_samplers("ddim-50,ddpm-250@final") == [("ddim", 50, False), ("ddpm", 250, True)]
    for bad in ("ddpm", "euler-10", "ddim-0", "", "ddim-5@start", "ddpm-250@final"):
        with pytest.raises(ValueError, match="samplers"):
            regimes.parse_samplers(bad)


def test_bootstrap_speedup():
    steps = [100, 200, 300, 400]
    u = np.array([[10, 8, 6, 5], [11, 8, 6, 5], [10, 9, 6, 5]], dtype=float)
    lo, hi, reached = regimes.bootstrap_speedup(steps, u, u, n_boot=200)
    assert lo == hi == 1.0 and reached == 1.0
    # the strategy reaches 5 at step 250 in every seed: 400 / 250 = 1.6 in every resample
    s = np.array([[9, 6, 4, 3]] * 3, dtype=float)
    lo, hi, reached = regimes.bootstrap_speedup(steps, u, s, n_boot=200)
    assert lo == pytest.approx(1.6) and hi == pytest.approx(1.6)
    # a strategy that never gets there: speed-up 0, reached share 0
    assert regimes.bootstrap_speedup(steps, u, u + 10, n_boot=50) == (0.0, 0.0, 0.0)
    # mixed seeds: the interval spans the per-seed answers
    s2 = np.array([[9, 6, 4, 3], [12, 11, 10, 9], [9, 6, 4, 3]], dtype=float)
    lo, hi, reached = regimes.bootstrap_speedup(steps, u, s2, n_boot=500)
    assert lo < 1.6 <= hi and 0 < reached < 1
    with pytest.raises(ValueError, match="one shape"):
        regimes.bootstrap_speedup(steps, u, s[:2])


def test_every_regime_profile_names_a_known_model_and_fits_its_evaluations():
    from speed_train.models import model_names

    known = {m.lower() for m in model_names()}
    for rname, reg in regimes.REGIMES.items():
        profiles = {k: v for k, v in reg.items() if k in ("cpu", "gpu")}
        assert "cpu" in profiles, rname
        for pname, prof in profiles.items():
            assert prof["model"].lower() in known, (rname, pname, prof["model"])
            assert prof["steps"] % prof["eval_every"] == 0, (rname, pname)  # the final step is scored


def test_study_needs_uniform_and_known_regimes(tmp_path):
    with pytest.raises(ValueError, match="uniform"):
        regimes.run_study(regimes="digits-pixel", strategies="speed", out=tmp_path, verbose=False)
    with pytest.raises(ValueError, match="unknown regime"):
        regimes.run_study(regimes="nope", out=tmp_path, verbose=False)


def test_tiny_slice_writes_csv_summary_and_plots(tmp_path, tmp_path_factory, monkeypatch):
    pytest.importorskip("sklearn")
    cache = tmp_path_factory.getbasetemp() / "shared-classifier-cache"  # shared with test_autoencoder.py
    cache.mkdir(exist_ok=True)
    monkeypatch.setenv("SPEED_KERNELS_CACHE", str(cache))
    out = tmp_path / "study"
    summ = regimes.run_study(regimes="smoke-digits-pixel", strategies="uniform,adaptive:warmup_steps=1,every=1",
                             seeds="0,1", samplers="ddim-2,ddpm-3@final", steps=4, eval_every=2, eval_samples=24,
                             n_boot=50, out=out, verbose=False)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == regimes.CSV_COLUMNS
    # 2 strategies x 2 seeds x (2 DDIM evaluations + 1 final DDPM one) x 3 metrics (mmd2, swd, fd)
    assert len(rows) == 36
    assert {r["step"] for r in rows} == {"2", "4"} and {r["sampler"] for r in rows} == {"ddim-2", "ddpm-3@final"}
    assert {r["step"] for r in rows if r["sampler"] == "ddpm-3@final"} == {"4"}
    final = summ["regimes"]["smoke-digits-pixel"]["samplers"]["ddpm-3@final"]
    assert all(t["speedup"] is None and np.isfinite(t["final"]) for t in final)
    assert not (out / "smoke-digits-pixel_ddpm3.png").exists()
    assert all(np.isfinite(float(r["value"])) for r in rows)
    table = summ["regimes"]["smoke-digits-pixel"]["samplers"]["ddim-2"]
    assert [t["strategy"] for t in table] == ["uniform", "adaptive:warmup_steps=1,every=1"]
    assert table[0]["speedup"] == pytest.approx(1.0) or table[0]["bound"] == "?"
    assert summ["regimes"]["smoke-digits-pixel"]["analysis"]["tau_schedule"] == 700
    assert (out / "smoke-digits-pixel_ddim2.png").read_bytes()[:4] == b"\x89PNG"
    assert "| uniform |" in (out / "summary.md").read_text()
    assert json.loads((out / "summary.json").read_text())["meta"]["seeds"] == [0, 1]
    # a second call reads the runs back (same settings): identical rows
    regimes.run_study(regimes="smoke-digits-pixel", strategies="uniform,adaptive:warmup_steps=1,every=1",
                      seeds="0,1", samplers="ddim-2,ddpm-3@final", steps=4, eval_every=2, eval_samples=24, n_boot=50,
                      out=out, verbose=False)
    with open(out / "results.csv") as f:
        assert list(csv.DictReader(f)) == rows
    # report only: trains nothing, summarises each strategy on the seeds it and uniform have finished
    adaptive = "adaptive:warmup_steps=1,every=1"
    summ = regimes.run_study(regimes="smoke-digits-pixel", strategies=f"uniform,{adaptive}",
                             seeds="0,1,2", samplers="ddim-2,ddpm-3@final", steps=4, eval_every=2, eval_samples=24,
                             n_boot=50, out=out, verbose=False, report_only=True)
    assert summ["regimes"]["smoke-digits-pixel"]["seeds"] == {"uniform": [0, 1], adaptive: [0, 1]}
    assert not (out / "runs" / "smoke-digits-pixel" / "uniform-seed2").exists()
    # a strategy recorded for seed 1 only is paired with uniform's seed 1, not with both of uniform's
    shutil.rmtree(out / "runs" / "smoke-digits-pixel" / f"{regimes._safe(adaptive)}-seed0")
    summ = regimes.run_study(regimes="smoke-digits-pixel", strategies=f"uniform,{adaptive},speed",
                             seeds="0,1", samplers="ddim-2,ddpm-3@final", steps=4, eval_every=2, eval_samples=24,
                             n_boot=50, out=out, verbose=False, report_only=True)
    reg = summ["regimes"]["smoke-digits-pixel"]
    assert reg["seeds"] == {"uniform": [0, 1], adaptive: [1], "speed": []}
    rows_ddim = {t["strategy"]: t for t in reg["samplers"]["ddim-2"]}
    assert rows_ddim[adaptive]["seeds"] == [1] and rows_ddim[adaptive]["final_sd"] is None
    assert rows_ddim[adaptive]["final"] == pytest.approx(
        [float(r["value"]) for r in rows if r["strategy"] == adaptive and r["seed"] == "1" and r["step"] == "4"
         and r["sampler"] == "ddim-2" and r["metric"] == reg["metric"]][0])
    assert rows_ddim["speed"]["seeds"] == [] and rows_ddim["speed"]["final"] is None
    assert "| speed | none | no record yet |" in (out / "summary.md").read_text()
    # records scored on another machine (its feature classifier gives another floor): a report reads
    # them with their own floor; a run that may train does not take them as its own
    for rec in (out / "runs" / "smoke-digits-pixel").glob("*/evals.json"):
        d = json.loads(rec.read_text())
        d["signature"]["floor"]["fd"] += 0.01
        rec.write_text(json.dumps(d))
    moved = json.loads((out / "runs" / "smoke-digits-pixel" / "uniform-seed0" / "evals.json").read_text())
    summ = regimes.run_study(regimes="smoke-digits-pixel", strategies=f"uniform,{adaptive}",
                             seeds="0,1", samplers="ddim-2,ddpm-3@final", steps=4, eval_every=2, eval_samples=24,
                             n_boot=50, out=out, verbose=False, report_only=True)
    reg = summ["regimes"]["smoke-digits-pixel"]
    assert reg["seeds"] == {"uniform": [0, 1], adaptive: [1]}
    assert reg["floor"]["fd"] == pytest.approx(moved["signature"]["floor"]["fd"])
    summ = regimes.run_study(regimes="smoke-digits-pixel", strategies="uniform,speed", train_only="speed",
                             seeds="0", samplers="ddim-2,ddpm-3@final", steps=4, eval_every=2, eval_samples=24,
                             n_boot=50, out=out, verbose=False)
    assert summ["regimes"]["smoke-digits-pixel"]["seeds"] == {"uniform": [], "speed": []}
    summ = regimes.run_study(regimes="smoke-digits-pixel", strategies="uniform", seeds="3", samplers="ddim-2",
                             steps=4, eval_every=2, eval_samples=24, n_boot=50, out=out, verbose=False, report_only=True)
    assert summ["regimes"]["smoke-digits-pixel"]["seeds"] == {"uniform": []}
    assert "no uniform run is recorded yet" in (out / "summary.md").read_text()


def test_data_tau_strategy_takes_the_analysis_tau():
    specs = regimes._regime_specs("uniform,speed:tau=data,speed:tau=auto,speed:tau=7,adaptive:fast_steps=2,slow_steps=6",
                                  770)
    assert [s[0] for s in specs] == ["uniform", "speed:tau=data", "speed:tau=auto", "speed:tau=7",
                                     "adaptive:fast_steps=2,slow_steps=6"]
    assert specs[1][1] == "speed" and specs[1][2]["tau"] == 770
    assert specs[2][2]["tau"] == "auto"
    assert "speed:tau=data" in regimes.STUDY_STRATEGIES
    with pytest.raises(ValueError, match="both tau=data and the literal tau=770"):
        regimes._regime_specs("uniform,speed:tau=data,speed:tau=770", 770)


def test_speedup_curve_reads_the_target_at_every_thousandth_step():
    steps = [500, 1000, 1500, 2000, 2500, 3000]
    u = np.array([[100.0, 80, 60, 40, 30, 20]] * 2)  # uniform, two identical seeds
    s = np.array([[80.0, 40, 20, 15, 12, 10]] * 2)   # reaches uniform's s=1000 score (80) at 500
    per = {"uniform": (steps, u, [0, 1]), "fast": (steps, s, [0, 1])}
    curve = regimes.speedup_curve(per, n_boot=50)
    assert curve["targets"] == [1000, 2000, 3000]
    rows = curve["strategies"]["fast"]["rows"]
    # s=1000: target 80, uniform 1000 / strategy 500; s=2000: target 40 at 1000; s=3000: 20 at 1500
    assert [r["speedup"] for r in rows] == [2.0, 2.0, 2.0]
    assert rows[0]["ci95"] == [2.0, 2.0]  # identical seeds: no spread
    slow = {"uniform": (steps, u, [0]), "slow": (steps, u + 50, [0])}
    rows = regimes.speedup_curve(slow)["strategies"]["slow"]["rows"]
    assert rows[0]["speedup"] == pytest.approx(1000 / 2500) and rows[-1]["speedup"] is None
    assert rows[0]["ci95"] == [None, None]


def test_train_only_must_name_strategies_of_the_study(tmp_path):
    with pytest.raises(ValueError, match="train-only"):
        regimes.run_study(regimes="smoke-digits-pixel", strategies="uniform,speed", train_only="p2", out=tmp_path,
                          verbose=False)
