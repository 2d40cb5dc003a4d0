"""`speed-kernels analyze --path flow`: SpeeD's areas on the flow-matching path and what each flow
strategy does there (share of draws, weight range), as a table, JSON or a picture of the areas,
P(sigma) and w(sigma).

Areas (docs/flow.md): g(sigma) = d/dsigma of the noise level of the unit-variance twin of x_t;
acceleration [0, sigma_ad) where g rises, deceleration [sigma_ad, tau) where it falls, convergence
[tau, 1] where it is below the official criterion's fraction of its peak (pure-noise end).
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Sequence

import numpy as np

from . import flow_strategies as F

GRID = np.linspace(0.0, 1.0, 20001)


def flow_areas(data_std: float = 1.0, rel_threshold: float | None = None) -> Dict[str, Any]:
    g = F.speed_increment(GRID, data_std)
    return {
        "sigma_ad": float(GRID[int(np.argmax(g))]),
        "tau": F.speed_tau(data_std, rel_threshold),
        "g_max": float(g.max()),
        "data_std": data_std,
        "rule": {"rel_threshold": F._ddpm_relative_threshold() if rel_threshold is None else rel_threshold},
    }


def flow_summary(strategy: F.FlowStrategy, area: Dict[str, Any], prediction: str = "v") -> Dict[str, Any]:
    cdf = lambda x: float(strategy.cdf(np.array([x]))[0])  # noqa: E731
    a, t = area["sigma_ad"], area["tau"]
    share = {"acceleration": cdf(a), "deceleration": cdf(t) - cdf(a), "convergence": 1.0 - cdf(t)}
    inner = GRID[(GRID > 0) & (GRID < 1)]
    w = strategy.weight(inner, prediction)
    before, after = inner < t, inner >= t

    def rng(m):
        return [float(w[m].min()), float(w[m].max())] if m.any() else None

    return {
        "label": strategy.name,
        "strategy": repr(strategy),
        "prediction": prediction,
        "share": share,
        "weight_before_tau": rng(before),
        "weight_argmax_before_tau": float(inner[before][int(np.argmax(w[before]))]) if before.any() else None,
        "weight_from_tau": rng(after),
    }


def format_table(area: Dict[str, Any], summaries: List[Dict[str, Any]]) -> str:
    lines = [
        f"flow path x_t = (1 - sigma) x0 + sigma eps, data std {area['data_std']}",
        f"  sigma_ad = {area['sigma_ad']:.4f}   peak of g = d/dsigma of the unit-variance noise level (g_max {area['g_max']:.4f})",
        f"  tau      = {area['tau']:.4f}   start of the convergence area (g < {area['rule']['rel_threshold']:.4g} g_max)",
    ]
    if summaries:
        lines.append("")
        head = f"  {'strategy':<28}{'accel':>8}{'decel':>8}{'conv':>8}   {'w range s<tau':>20}  {'peak s':>7}  {'w range s>=tau':>20}"
        lines += [head, "  " + "-" * (len(head) - 2)]
        fmt = lambda r: "-" if r is None else f"[{r[0]:.4g}, {r[1]:.4g}]"  # noqa: E731
        for sm in summaries:
            sh = sm["share"]
            pk = "-" if sm["weight_argmax_before_tau"] is None else f"{sm['weight_argmax_before_tau']:.3f}"
            lines.append(f"  {sm['label']:<28}{100 * sh['acceleration']:7.1f}%{100 * sh['deceleration']:7.1f}%"
                         f"{100 * sh['convergence']:7.1f}%   {fmt(sm['weight_before_tau']):>20}  {pk:>7}  "
                         f"{fmt(sm['weight_from_tau']):>20}")
        lines.append(f"  (shares: fraction of drawn sigma in each area; weights on the {summaries[0]['prediction']} MSE)")
    return "\n".join(lines)


def plot_flow(area: Dict[str, Any], strategies: Sequence[F.FlowStrategy], path: str, prediction: str = "v") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = GRID[1:-1]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))

    def shade(ax):
        ax.axvspan(0, area["sigma_ad"], color="tab:green", alpha=0.08)
        ax.axvspan(area["sigma_ad"], area["tau"], color="tab:orange", alpha=0.08)
        ax.axvspan(area["tau"], 1, color="tab:red", alpha=0.12)

    ax = axes[0]
    shade(ax)
    d = area["data_std"]
    ax.plot(s, s / np.sqrt((1 - s) ** 2 * d * d + s * s), label="noise level s(sigma)")
    ax.plot(s, F.speed_increment(s, d) / area["g_max"], label="g / g_max")
    ax.set_title("areas: accel / decel / convergence")
    ax.set_xlabel("sigma (1 = noise)")
    ax.legend(fontsize=8)
    for st in strategies:
        axes[1].plot(s, st.pdf(s), label=st.name)
        axes[2].plot(s, st.weight(s, prediction), label=st.name)
    for ax, title in ((axes[1], "P(sigma)"), (axes[2], f"w(sigma) on the {prediction} MSE")):
        shade(ax)
        ax.set_title(title)
        ax.set_xlabel("sigma (1 = noise)")
        ax.legend(fontsize=8)
    axes[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


DEFAULT_STRATEGIES = ("uniform", "logit_normal", "speed")


def run_flow_analyze(args, names, inline, params) -> int:
    """The --path flow branch of `analyze`: `names` the strategies, `inline` their NAME:K=V
    parameters, `params` the routed --param values (parsed by speed_kernels.analysis)."""
    data_std = float(getattr(args, "data_std", None) or 1.0)
    prediction = args.prediction or "v"
    area = flow_areas(data_std)
    strategies = []
    for n, own in zip(names, inline):
        kw = {**params[n], **own}
        if {"speed", "caw"} & set(n.split("+")):  # SpeeD's tau follows the data std
            kw.setdefault("data_std", data_std)
        strategies.append(F.get(n, **kw))
    summaries = [flow_summary(st, area, prediction) for st in strategies]
    if args.plot:
        plot_flow(area, strategies, args.plot, prediction)
    if args.json:
        out = {"path": "flow", "areas": area, "strategies": summaries}
        if args.plot:
            out["plot"] = args.plot
        print(json.dumps(out, indent=2))
    else:
        print(format_table(area, summaries))
        if args.plot:
            print(f"\nplot written to {args.plot}")
    return 0
