"""`analyze --path flow`: areas from the increment, shares from each density's CDF, the picture."""
import json

import numpy as np
import pytest

from speed_kernels import flow_strategies as F
from speed_kernels.cli import main
from speed_kernels.flow_analysis import flow_areas, flow_summary


def test_areas_and_shares():
    area = flow_areas(1.0)
    g = F.speed_increment(np.linspace(0, 1, 200001))
    assert area["sigma_ad"] == pytest.approx(np.linspace(0, 1, 200001)[g.argmax()], abs=1e-4)
    assert area["tau"] == F.speed_tau(1.0)
    sm = flow_summary(F.get("uniform"), area)
    assert sm["share"]["acceleration"] == pytest.approx(area["sigma_ad"])
    assert sm["share"]["convergence"] == pytest.approx(1 - area["tau"])
    sp = flow_summary(F.get("speed", k=5), area)
    z = 5 * area["tau"] + 1 - area["tau"]
    assert sp["share"]["convergence"] == pytest.approx((1 - area["tau"]) / z)
    assert sp["weight_before_tau"][1] == pytest.approx(0.6, abs=1e-6) and sp["weight_from_tau"] == [1.0, 1.0]


def test_cli_json_and_plot(tmp_path, capsys):
    png = tmp_path / "flow.png"
    rc = main(["analyze", "--path", "flow", "--strategy", "uniform", "--strategy", "logit_normal:shift=3",
               "--strategy", "speed", "--data-std", "0.5", "--json", "--plot", str(png)])
    assert rc == 0 and png.stat().st_size > 10000
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == "flow" and out["areas"]["data_std"] == 0.5
    assert out["areas"]["tau"] == pytest.approx(F.speed_tau(0.5))
    labels = [s["label"] for s in out["strategies"]]
    assert labels == ["uniform", "logit_normal", "speed"]
    shifted = out["strategies"][1]["share"]
    base = F.get("logit_normal", shift=3.0)
    assert shifted["convergence"] == pytest.approx(1 - float(base.cdf(np.array([out["areas"]["tau"]]))[0]))
    assert out["strategies"][0]["prediction"] == "v"


def test_cli_flow_errors(capsys):
    assert main(["analyze", "--path", "flow", "--strategy", "nope"]) == 2
    assert "unknown flow strategy" in capsys.readouterr().err


def test_train_cli_accepts_the_flow_objective():
    import argparse

    from speed_train.cli import add_commands, config_from_args

    p = argparse.ArgumentParser()
    add_commands(p.add_subparsers(dest="command"))
    args = p.parse_args(["train", "--objective", "flow", "--sampler", "heun", "--param", "shift=3", "--strategy",
                         "logit_normal"])
    cfg, _ = config_from_args(args)
    assert cfg.objective == "flow" and cfg.sampler == "heun" and cfg.strategy_params == {"shift": 3}
