import argparse
import json

import numpy as np
import pytest

from speed_kernels import analysis as A
from speed_kernels import strategies as S
from speed_kernels.schedules import NoiseSchedule

LIN = NoiseSchedule.linear()


def abar_np(s):
    return np.cumprod(1.0 - s.betas.numpy())


def test_increment_mean_and_variance_independent():
    a = abar_np(LIN)
    np.testing.assert_allclose(A.increment_mean_coef(LIN), np.sqrt(a[1:]) - np.sqrt(a[:-1]), rtol=1e-10)
    np.testing.assert_allclose(A.increment_variance(LIN), a[:-1] - a[1:], rtol=1e-9)
    assert A.increment_mean_coef(LIN).shape == (999,)
    np.testing.assert_allclose(A.increment_mean_coef_rate(LIN), np.gradient(np.sqrt(a[1:]) - np.sqrt(a[:-1])),
                               rtol=1e-8, atol=1e-15)
    np.testing.assert_allclose(A.increment_variance_rate(LIN), np.gradient(a[:-1] - a[1:]), rtol=1e-8, atol=1e-15)
    np.testing.assert_allclose(A.marginal_variance_rate(LIN), np.gradient(1 - a), rtol=1e-10)
    np.testing.assert_allclose(A.noise_std_rate(LIN, normalized=True), 1000 * np.gradient(np.sqrt(1 - a)), rtol=1e-10)
    with pytest.raises(ValueError, match="kind"):
        A.increment_variance(LIN, kind="other")


def test_markov_increment_variance_monte_carlo():
    s = NoiseSchedule.linear(T=50, beta_start=1e-3, beta_end=0.2)
    a = abar_np(s)
    b = s.betas.numpy()
    rng = np.random.default_rng(0)
    x0 = 0.7
    for t in (3, 20, 40):
        xt = np.sqrt(a[t]) * x0 + np.sqrt(1 - a[t]) * rng.standard_normal(400000)
        xn = np.sqrt(1 - b[t + 1]) * xt + np.sqrt(b[t + 1]) * rng.standard_normal(xt.size)
        d = xn - xt
        assert d.mean() == pytest.approx(A.increment_mean_coef(s)[t] * x0, abs=4e-3)
        assert d.var() == pytest.approx(A.increment_variance(s, kind="markov")[t], rel=2e-2)


@pytest.mark.parametrize("ctor,t_ad,tau,pivot", [
    (NoiseSchedule.linear, 219, 700, 642),
    (NoiseSchedule.scaled_linear, 313, 944, 866),
    (NoiseSchedule.cosine, 495, 980, 959),
])
def test_areas_known_values(ctor, t_ad, tau, pivot):
    ar = A.areas(ctor())
    assert (ar["t_ad"], ar["tau"], ar["pivot"]) == (t_ad, tau, pivot)
    assert ar["acceleration"] == [0, t_ad] and ar["deceleration"] == [t_ad, tau] and ar["convergence"] == [tau, 1000]
    assert ar["rule"]["tau_threshold"] == A.TAU_THRESHOLD


def test_linear_areas_match_official_formulas():
    a = abar_np(LIN)
    g = np.gradient(np.sqrt(1 - a))
    ar = A.areas(LIN)
    assert ar["tau"] == int(np.argmax(g < 5e-5)) + 1 == 700
    assert ar["pivot"] == int(np.argmax(g < 1e-4)) + 1 == 642
    # t_ad is the peak of the CAW g and the zero crossing of the increment variance's rate
    caw = S.get("speed").weights(LIN).numpy()
    assert int(np.argmax(caw[:700])) == ar["t_ad"] == int(np.argmax(np.gradient(1 - a)))
    inc = a[:-1] - a[1:]
    assert abs(int(np.argmax(inc)) - ar["t_ad"]) <= 1
    rate = A.increment_variance_rate(LIN)
    assert (rate[: ar["t_ad"] - 2] > 0).all() and (rate[ar["t_ad"] + 1:] <= 0).all()


@pytest.mark.parametrize("T", [250, 4000])
def test_tau_rule_is_T_invariant(T):
    s = NoiseSchedule.linear(T=T, beta_start=1e-4 * 1000 / T, beta_end=0.02 * 1000 / T)
    ar = A.areas(s)
    assert ar["tau"] / T == pytest.approx(0.7, abs=0.006)
    assert ar["pivot"] / T == pytest.approx(0.642, abs=0.006)
    assert ar["t_ad"] / T == pytest.approx(0.219, abs=0.006)


def test_zero_terminal_schedule_areas():
    ar = A.areas(LIN.rescale_zero_terminal_snr())
    assert 0 < ar["t_ad"] < ar["tau"] <= 1000 and 0 <= ar["pivot"] <= 999


def test_shares_and_summary():
    ar = A.areas(LIN)
    sh = A.area_shares(np.full(1000, 1e-3), ar)
    assert sh == pytest.approx({"acceleration": 0.219, "deceleration": 0.481, "convergence": 0.3})
    sm = A.strategy_summary("speed", LIN)
    assert sm["mirror"] and sm["pivot"] == 642
    assert sm["share_drawn"]["convergence"] == pytest.approx(300 / 3800)
    assert 1 - sm["share"]["convergence"] == pytest.approx(0.5 * 3500 / 3800 + 0.5)  # ~96 % before tau
    assert sm["weight_before_tau"] == pytest.approx([0.407, 0.600], abs=5e-4)
    assert sm["weight_argmax_before_tau"] == 219 and sm["weight_from_tau"] == [1.0, 1.0]
    assert sum(sm["share"].values()) == pytest.approx(1.0)
    assert A.strategy_label(S.get("speed", variant="paper")) == "speed(variant=paper)"


def run_cli(argv, capsys):
    """Through the package's dispatcher if speed_train is importable, else through our parser alone."""
    try:
        import speed_train.cli  # noqa: F401
        from speed_kernels.cli import main as main_parser
    except ImportError:
        def main_parser(argv):
            parser = argparse.ArgumentParser(prog="speed-kernels")
            sub = parser.add_subparsers(dest="command")
            A.add_analyze_command(sub)
            args = parser.parse_args(argv)
            try:
                return args.func(args)
            except ValueError as exc:
                print(exc)
                return 2
    rc = main_parser(argv)
    return rc, capsys.readouterr().out


def test_cli_json(capsys):
    rc, out = run_cli(["analyze", "--schedule", "linear", "--strategy", "speed", "--strategy", "p2", "--json"], capsys)
    assert rc == 0
    d = json.loads(out)
    assert (d["areas"]["t_ad"], d["areas"]["tau"], d["areas"]["pivot"]) == (219, 700, 642)
    names = [s["name"] for s in d["strategies"]]
    assert names == ["speed", "p2"]
    assert d["strategies"][0]["share"]["convergence"] == pytest.approx(0.5 * 300 / 3800)
    rc, out = run_cli(["analyze", "--schedule", "cosine", "--strategy", "speed", "--param", "tau=auto", "--json"],
                      capsys)
    d = json.loads(out)
    assert rc == 0 and d["areas"]["tau"] == 980 and d["strategies"][0]["params"]["tau"] == "auto"


def test_cli_table_and_plot(tmp_path, capsys):
    png = tmp_path / "areas.png"
    rc, out = run_cli(["analyze", "--schedule", "linear", "--strategy", "speed", "--strategy", "speed+p2",
                       "--param", "speed:k=2", "--plot", str(png)], capsys)
    assert rc == 0
    assert "t_ad" in out and "700" in out and "642" in out and "speed(k=2.0)" in out
    assert png.exists() and png.stat().st_size > 20000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors(capsys):
    rc, _ = run_cli(["analyze", "--strategy", "nope", "--json"], capsys)
    assert rc == 2
    rc, _ = run_cli(["analyze", "--strategy", "speed", "--param", "lam=3"], capsys)
    assert rc == 2
    rc, _ = run_cli(["analyze", "--strategy", "speed", "--param", "p2:k=3"], capsys)
    assert rc == 2
    rc, _ = run_cli(["analyze", "--strategy", "speed:k", "--json"], capsys)
    assert rc == 2


def test_cli_inline_params_compare_variants(capsys):
    rc, out = run_cli(["analyze", "--strategy", "speed", "--strategy", "speed:variant=paper,k=2", "--json"], capsys)
    assert rc == 0
    d = json.loads(out)
    a, b = d["strategies"]
    assert a["params"]["variant"] == "code" and a["mirror"]
    assert b["params"]["variant"] == "paper" and b["params"]["k"] == 2 and not b["mirror"]
    with pytest.raises(ValueError, match="schedule"):
        A.make_schedule("sigmoid")


def test_analyze_recommendation_names_a_registered_strategy_and_its_figure():
    """The advice `speed-kernels analyze` prints names a strategy the library has and a figure in docs/."""
    import re
    from pathlib import Path

    from speed_kernels import strategies
    from speed_kernels.analysis import RECOMMENDATION

    name = re.search(r"--strategy ([\w+:=.-]+)", RECOMMENDATION).group(1)
    strategies.get(name)  # raises for an unknown name
    fig = re.search(r"docs/[\w.-]+\.png", RECOMMENDATION).group(0)
    assert (Path(__file__).resolve().parents[1] / fig).is_file(), fig
    # and the README's first advice is the same one
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    advice = readme[readme.index("**Which strategy to start with**"):]
    assert re.search(r"--strategy ([\w+:=.-]+)", advice).group(1) == name
