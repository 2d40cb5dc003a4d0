"""The time-step analysis of SpeeD (Wang et al. 2024, Section 2 and Theorem 1), and the
``speed-kernels analyze`` command.

The schedule maths it draws on (process increments, the three areas, τ, the mirror pivot) lives in
``speed_kernels.process`` and is re-exported here; strategies use that module too, so this one
may import strategies without a cycle.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from speed_kernels import strategies as S
from speed_kernels.process import (  # noqa: F401  (re-exported: analysis.areas etc. are public)
    AREA_NAMES,
    PIVOT_THRESHOLD,
    TAU_THRESHOLD,
    _check,
    area_shares,
    areas,
    increment_mean_coef,
    increment_mean_coef_rate,
    increment_variance,
    increment_variance_rate,
    marginal_variance,
    marginal_variance_rate,
    mirror_pivot,
    noise_std,
    noise_std_rate,
)
from speed_kernels import process as _process
from speed_kernels.schedules import NoiseSchedule

__all__ = [  # the process maths re-exported from speed_kernels.process, and the analysis itself
    *_process.__all__,
    "strategy_summary",
    "make_schedule",
    "plot_analysis",
    "add_analyze_command",
]

def strategy_label(st: Any) -> str:
    """The strategy's name plus the parameters that differ from their defaults, e.g. ``speed(variant=paper)``."""
    import inspect

    if hasattr(st, "sampling") and hasattr(st, "weighting"):
        return f"{strategy_label(st.sampling)}+{strategy_label(st.weighting)}"
    try:
        sig = inspect.signature(type(st).__init__)
        defaults = {k: v.default for k, v in sig.parameters.items() if v.default is not inspect.Parameter.empty}
    except (TypeError, ValueError):  # pragma: no cover
        defaults = {}
    changed = [f"{k}={v}" for k, v in st.params.items() if k not in defaults or defaults[k] != v]
    return f"{st.name}({', '.join(changed)})" if changed else st.name


def _range(seg: np.ndarray) -> Optional[List[float]]:
    return [float(seg.min()), float(seg.max())] if seg.size else None


def strategy_summary(strategy: Any, schedule: NoiseSchedule, *, step: int = 0, prediction: str = "eps",
                     batch_size: Optional[int] = None) -> Dict[str, Any]:
    """Tables and per-area numbers of one strategy on one schedule.

    ``probs_effective`` is the distribution of the t of a random batch sample after the official
    SpeeD mirror step when the strategy mirrors (large-batch limit if ``batch_size`` is None)."""

    st = S.get(strategy) if isinstance(strategy, str) else strategy
    area = areas(schedule)
    probs = st.probs(schedule, step).numpy()
    weights = st.weights(schedule, prediction).numpy()
    pivot = st.pivot(schedule)
    eff = S.effective_probs(probs, pivot, batch_size).numpy() if st.mirror else probs
    by_area = {}
    for nm in AREA_NAMES:
        lo, hi = area[nm]
        seg = weights[lo:hi]
        by_area[nm] = _range(seg)
    return {
        "name": st.name,
        "label": strategy_label(st),
        "params": st.params,
        "mirror": bool(st.mirror),
        "dynamic": bool(st.dynamic),
        "pivot": int(pivot) if st.mirror else None,
        "step": int(step),
        "prediction": prediction,
        "share": area_shares(eff, area),
        "share_drawn": area_shares(probs, area),
        "weight_min": float(weights.min()),
        "weight_max": float(weights.max()),
        "weight_argmax": int(np.argmax(weights)),
        "weight_before_tau": _range(weights[: area["tau"]]),
        "weight_argmax_before_tau": int(np.argmax(weights[: area["tau"]])) if area["tau"] > 0 else None,
        "weight_from_tau": _range(weights[area["tau"]:]),
        "weight_by_area": by_area,
        "mean_weight": float(np.dot(eff, weights)),
        "probs": probs,
        "probs_effective": eff,
        "weights": weights,
    }


# ---------------------------------------------------------------------------- plot
_AREA_COLOURS = {"acceleration": "#fde0c5", "deceleration": "#d6eaf8", "convergence": "#e5e5e5"}


def _shade(ax, area, labels: bool = False):
    for nm in AREA_NAMES:
        lo, hi = area[nm]
        if hi > lo:
            ax.axvspan(lo - 0.5, hi - 0.5, color=_AREA_COLOURS[nm], alpha=0.9, lw=0, zorder=0,
                       label=f"{nm} [{lo}, {hi})" if labels else None)
    for x, ls in ((area["t_ad"], "--"), (area["tau"], "-")):
        ax.axvline(x - 0.5, color="0.35", lw=0.8, ls=ls, zorder=1)


def plot_analysis(schedule: NoiseSchedule, summaries: Sequence[Dict[str, Any]], path: str,
                  prediction: str = "eps") -> str:
    """Draw the curves with the areas shaded and the strategies' P(t) and w(t); save to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    area = areas(schedule)
    T = schedule.T
    t_inc = np.arange(T - 1) + 0.5  # the increment t -> t+1 sits between the two steps
    t = np.arange(T)
    mean_c = increment_mean_coef(schedule)
    var_c = increment_variance(schedule)
    mean_r = increment_mean_coef_rate(schedule)
    var_r = increment_variance_rate(schedule)
    std_r = noise_std_rate(schedule, normalized=True)

    fig, axes = plt.subplots(5, 1, figsize=(16, 15), sharex=True,
                             gridspec_kw={"height_ratios": [1.1, 1.0, 0.9, 1.2, 1.2]})
    title = (f"SpeeD time-step analysis — schedule {schedule.name}, T = {T}:  "
             f"t_ad = {area['t_ad']},  τ = {area['tau']},  mirror pivot = {area['pivot']}")
    fig.suptitle(title, fontsize=13, fontweight="bold", y=0.995)

    def peak(x):
        # normalise by the largest value before τ: the last steps of a capped schedule (cosine's
        # β ≤ 0.999) have one-step artefacts that would otherwise flatten the whole curve
        m = np.max(np.abs(x[: max(area["tau"], 2)]))
        return m if m > 0 else 1.0

    ax = axes[0]
    _shade(ax, area, labels=True)
    ax.plot(t_inc, np.abs(mean_c) / peak(mean_c), color="#1f77b4", lw=2,
            label=f"|mean coef| |√ᾱ(t+1) − √ᾱ(t)|  (peak {peak(mean_c):.2e})")
    ax.plot(t_inc, var_c / peak(var_c), color="#d62728", lw=2,
            label=f"variance ᾱ(t) − ᾱ(t+1)  (peak {peak(var_c):.2e})")
    ax.set_ylabel("normalised to peak")
    ax.set_title("Process increment δ = x(t+1) − x(t) | x0  (Theorem 1)", loc="left", fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, framealpha=0.9)
    ax.set_ylim(0, 1.15)

    ax = axes[1]
    _shade(ax, area)
    ax.axhline(0, color="0.2", lw=0.7)
    ax.plot(t_inc, -mean_r / peak(mean_r), color="#1f77b4", lw=2,
            label=f"−∂t mean coef  (peak {peak(mean_r):.2e})")
    ax.plot(t_inc, var_r / peak(var_r), color="#d62728", lw=2,
            label=f"∂t variance  (peak {peak(var_r):.2e})")
    ax.annotate(f"t_ad = {area['t_ad']}\n(variance peaks)", xy=(area["t_ad"], 0), xytext=(area["t_ad"] + 0.04 * T, 0.55),
                fontsize=9, arrowprops=dict(arrowstyle="->", color="0.3"))
    lo = min(-0.1, float(np.min(-mean_r[: area["tau"]] / peak(mean_r))), float(np.min(var_r[: area["tau"]] / peak(var_r))))
    ax.set_ylim(max(lo, -1.1) - 0.05, 1.1)
    ax.set_ylabel("normalised to peak")
    ax.set_title("Rates of change: acceleration (variance grows) → deceleration (it shrinks)", loc="left", fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, framealpha=0.9)

    ax = axes[2]
    _shade(ax, area)
    ax.semilogy(t, np.maximum(std_r, 1e-12), color="#2ca02c", lw=2, label="T·∂t √(1−ᾱ)  (noise std per unit t/T)")
    ax.axhline(TAU_THRESHOLD, color="#2ca02c", ls=":", lw=1.2, label=f"τ threshold {TAU_THRESHOLD}")
    ax.axhline(PIVOT_THRESHOLD, color="#9467bd", ls=":", lw=1.2, label=f"pivot threshold {PIVOT_THRESHOLD}")
    ax.axvline(area["pivot"] - 0.5, color="#9467bd", lw=1.0, ls="-.")
    ax.text(area["pivot"], ax.get_ylim()[0] * 3 if ax.get_ylim()[0] > 0 else 1e-3, f" pivot {area['pivot']}",
            color="#9467bd", fontsize=9, ha="right", va="bottom")
    ax.text(area["tau"], TAU_THRESHOLD * 1.3, f" τ = {area['tau']}", fontsize=9, va="bottom")
    ax.set_ylabel("rate (log)")
    ax.set_title("Where the process converges: the τ rule", loc="left", fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, framealpha=0.9)

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax_p, ax_w = axes[3], axes[4]
    _shade(ax_p, area)
    _shade(ax_w, area)
    ax_p.axhline(1.0 / T, color="0.4", ls="--", lw=1, label="uniform 1/T")
    ax_w.axhline(1.0, color="0.4", ls="--", lw=1, label="weight 1")
    styles = ["-", "--", "-.", (0, (5, 1, 1, 1, 1, 1))]
    for i, sm in enumerate(summaries):
        c = colours[i % len(colours)]
        ls = styles[i % len(styles)]
        lw = 2.4 if i == 0 else 1.8
        share = sm["share"]
        name = sm["label"] + (f" @ step {sm['step']}" if sm["dynamic"] else "")
        lab = (f"{name}: {100 * share['acceleration']:.0f}% / {100 * share['deceleration']:.0f}% / "
               f"{100 * share['convergence']:.0f}%")
        if sm["mirror"]:
            ax_p.plot(t, sm["probs"], color=c, lw=1.0, ls=":", alpha=0.9, label=f"{name}: drawn (before mirror)")
            lab += f"  (effective, mirror at {sm['pivot']})"
        ax_p.plot(t, sm["probs_effective"], color=c, lw=lw, ls=ls, label=lab)
        wb, wa = sm["weight_before_tau"], sm["weight_from_tau"]
        wl = name
        if wb:
            wl += f": t<τ [{wb[0]:.3g}, {wb[1]:.3g}]"
            if wb[1] > wb[0]:
                wl += f" peak at {sm['weight_argmax_before_tau']}"
        if wa:
            wl += f"; t≥τ [{wa[0]:.3g}, {wa[1]:.3g}]"
        ax_w.plot(t, sm["weights"], color=c, lw=lw, ls=ls, label=wl)
    ax_p.set_ylabel("P(t)")
    ax_p.set_ylim(bottom=0)
    ax_p.set_title("Sampling P(t) of each sample; legend: share in acceleration / deceleration / convergence",
                   loc="left", fontsize=11)
    ax_p.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, framealpha=0.9)
    ax_w.set_ylabel(f"w(t)  ({prediction} MSE)")
    ax_w.set_ylim(bottom=0)
    ax_w.set_title("Loss weight w(t)", loc="left", fontsize=11)
    ax_w.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, framealpha=0.9)
    ax_w.set_xlabel("time step t  (larger = noisier)")
    ax_w.set_xlim(-0.5, T - 0.5)
    for ax in axes:
        ax.grid(alpha=0.25, lw=0.5)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- CLI
_SCHEDULES = ("linear", "cosine", "scaled_linear")


def make_schedule(name: str, T: int = 1000, zero_snr: bool = False) -> NoiseSchedule:
    """A named schedule (linear, cosine, scaled_linear) of T steps, optionally zero-terminal-SNR."""
    if name not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(_SCHEDULES)}, got {name!r}")
    s = getattr(NoiseSchedule, name)(T)
    return s.rescale_zero_terminal_snr() if zero_snr else s


# ---------------------------------------------------------------------------- KEY=VALUE parameters
# The one parser for strategy parameters on every command line (analyze, train, compare):
#   --param [STRATEGY:]KEY=VALUE        (repeatable; no prefix: every chosen strategy that has KEY)
#   NAME:KEY=VALUE,KEY=VALUE            (a strategy with its own parameters, in --strategy)


def parse_value(text: str) -> Any:
    """'5' -> 5, '0.6' -> 0.6, 'true' -> True, 'none' -> None, anything else stays a string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text.strip()


def split_key_value(item: str, option: str = "--param") -> tuple:
    """'speed:k=5' -> ('speed', 'k', 5); 'k=5' -> ('', 'k', 5)."""
    key, sep, val = str(item).partition("=")
    target, _, key = key.rpartition(":")
    if not sep or not key.strip():
        raise ValueError(f"{option} must look like [STRATEGY:]key=value, got {item!r}")
    return target.strip(), key.strip(), parse_value(val)


def strategy_parameters(name: str) -> Optional[List[str]]:
    """The keyword parameters strategy ``name`` accepts ([] for an 'a+b' combination, None for a
    factory taking **kwargs). Unknown name -> ValueError listing the known ones."""
    import inspect

    from speed_kernels import strategies as S

    if "+" in name:
        for part in name.split("+", 1):
            strategy_parameters(part)
        return []
    if name not in S.names():
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(S.names())}")
    factory = S.factory(name)
    if isinstance(factory, type) and factory.__init__ is S.Strategy.__init__:
        return []  # the base constructor: **params only to refuse any
    sig = inspect.signature(factory)
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return [p for p in sig.parameters if p != "self"]


def route_params_unchecked(items: Sequence[str], names: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """``[STRATEGY:]KEY=VALUE`` items -> {strategy: {key: value}}, an item without a strategy going
    to every one, for registries that check parameter names themselves (flow strategies)."""
    out: Dict[str, Dict[str, Any]] = {n: {} for n in names}
    for item in items:
        target, key, val = split_key_value(item)
        if target and target not in out:
            raise ValueError(f"--param {item!r} names strategy {target!r}, not among {', '.join(names)}")
        for n in ([target] if target else names):
            out[n][key] = val
    return out


def parse_strategy_spec(spec: str) -> tuple:
    """'speed:k=5,lam=0.6' -> ('speed', {'k': 5, 'lam': 0.6}); 'uniform' -> ('uniform', {})."""
    name, _, rest = str(spec).partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"strategy must look like NAME or NAME:KEY=VALUE,KEY=VALUE, got {spec!r}")
    params: Dict[str, Any] = {}
    for kv in (x for x in rest.split(",") if x.strip()):
        target, key, val = split_key_value(kv, option=f"strategy {name!r} parameter")
        if target:
            raise ValueError(f"strategy {name!r} parameter must be key=value, got {kv!r}")
        params[key] = val
    return name, params


def parse_params(items: Sequence[str], strategy_names: Sequence[str], option: str = "--param"
                 ) -> Dict[str, Dict[str, Any]]:
    """``[STRATEGY:]KEY=VALUE`` items -> {strategy: {key: value}} for the chosen strategies,
    checked against each strategy's signature: a prefixed item goes to that strategy (which must be
    chosen and have KEY); an unprefixed one to every chosen strategy that has KEY, and it is an
    error when none has it (the message lists each strategy's parameters)."""
    out: Dict[str, Dict[str, Any]] = {n: {} for n in strategy_names}
    accepted = {n: strategy_parameters(n) for n in out}

    def has(n, key):
        return accepted[n] is None or key in accepted[n]

    def listing(ns):
        return "; ".join(f"{n}: {', '.join(accepted[n]) if accepted[n] else '(none)'}" for n in ns)

    for item in items or []:
        target, key, val = split_key_value(item, option)
        if target:
            if target not in out:
                raise ValueError(f"{option} {item!r} names strategy {target!r}, which is not among the chosen "
                                 f"strategies {list(out)}")
            if not has(target, key):
                raise ValueError(f"{option} {item!r}: strategy {target!r} has no parameter {key}; "
                                 f"parameters of {listing([target])}")
            out[target][key] = val
            continue
        takers = [n for n in out if has(n, key)]
        if not takers:
            raise ValueError(f"{option} {item!r}: no parameter {key} in the chosen strategies; parameters of "
                             f"{listing(out)}")
        for n in takers:
            out[n][key] = val
    return out


def _fmt_range(r: Optional[List[float]]) -> str:
    return "-" if r is None else f"[{r[0]:.4g}, {r[1]:.4g}]"


def _format_table(schedule: NoiseSchedule, area: Dict[str, Any], summaries: List[Dict[str, Any]]) -> str:
    lines = [
        f"schedule {schedule.name}, T = {schedule.T}",
        f"  t_ad  = {area['t_ad']:5d}   acceleration/deceleration boundary (peak of d(1-abar)/dt)",
        f"  tau   = {area['tau']:5d}   start of the convergence area (T*d sqrt(1-abar)/dt < {area['rule']['tau_threshold']})",
        f"  pivot = {area['pivot']:5d}   official SpeeD mirror pivot (T*d sqrt(1-abar)/dt < {area['rule']['pivot_threshold']})",
        f"  areas: acceleration [0, {area['t_ad']}), deceleration [{area['t_ad']}, {area['tau']}), "
        f"convergence [{area['tau']}, {schedule.T})",
    ]
    if summaries:
        lines.append("")
        head = (f"  {'strategy':<26}{'accel':>8}{'decel':>8}{'conv':>8}   {'w range t<tau':>18}  {'peak t':>6}"
                f"  {'w range t>=tau':>18}  notes")
        lines.append(head)
        lines.append("  " + "-" * (len(head) - 2))
        for sm in summaries:
            sh = sm["share"]
            notes = []
            if sm["mirror"]:
                d = sm["share_drawn"]
                notes.append(f"mirror at {sm['pivot']}; drawn before mirror "
                             f"{100 * d['acceleration']:.1f}/{100 * d['deceleration']:.1f}/{100 * d['convergence']:.1f}%")
            if sm["dynamic"]:
                notes.append(f"dynamic, shown at step {sm['step']}")
            lines.append(
                f"  {sm['label']:<26}{100 * sh['acceleration']:7.1f}%{100 * sh['deceleration']:7.1f}%"
                f"{100 * sh['convergence']:7.1f}%   {_fmt_range(sm['weight_before_tau']):>18}  "
                f"{'-' if sm['weight_argmax_before_tau'] is None else sm['weight_argmax_before_tau']:>6}  "
                f"{_fmt_range(sm['weight_from_tau']):>18}  {'; '.join(notes)}"
            )
        lines.append("  (shares: fraction of batch samples in each area; weights on the "
                     f"{summaries[0]['prediction']} MSE)")
    return "\n".join(lines)


def _run_analyze(args: argparse.Namespace) -> int:
    if getattr(args, "path", "ddpm") == "flow":  # flow matching: speed_kernels.flow_analysis
        from speed_kernels.flow_analysis import DEFAULT_STRATEGIES, run_flow_analyze

        specs = [parse_strategy_spec(e) for e in (args.strategy or DEFAULT_STRATEGIES)]
        names = [n for n, _ in specs]
        # flow densities check their own parameters when built (flow_strategies.get)
        return run_flow_analyze(args, names, [own for _, own in specs],
                                route_params_unchecked(args.param or [], list(dict.fromkeys(names))))
    args.prediction = args.prediction or "eps"
    schedule = make_schedule(args.schedule, args.T, args.zero_snr)
    area = areas(schedule)
    entries = list(args.strategy) if args.strategy else ["uniform", "speed"]

    names, inline = [], []
    for e in entries:  # NAME or NAME:KEY=VALUE,KEY=VALUE
        n, own = parse_strategy_spec(e)
        names.append(n)
        inline.append(own)
    params = parse_params(args.param or [], list(dict.fromkeys(names)))
    summaries = []
    for n, own in zip(names, inline):
        kw = {**params[n], **own}
        st = S.get(n, **kw) if kw else S.get(n)
        summaries.append(strategy_summary(st, schedule, step=args.step, prediction=args.prediction,
                                          batch_size=args.batch_size))
    if args.plot:
        plot_analysis(schedule, summaries, args.plot, prediction=args.prediction)
    data_rep = None
    if getattr(args, "data", None):  # the data-aware convergence area (speed_kernels.data_analysis)
        from speed_kernels.data_analysis import data_areas, format_data_report, load_data_array

        data_rep = data_areas(load_data_array(args.data, getattr(args, "data_loader", None)), schedule)
    if args.json:
        out = {
            "recommendation": RECOMMENDATION,
            "schedule": {"name": schedule.name, "T": schedule.T, "zero_terminal_snr": schedule.zero_terminal_snr},
            "areas": area,
            "strategies": [{k: v for k, v in sm.items() if k not in ("probs", "probs_effective", "weights")}
                           for sm in summaries],
        }
        if args.plot:
            out["plot"] = args.plot
        if data_rep is not None:
            out["data"] = {"spec": args.data, **{k: v for k, v in data_rep.items() if k != "info_nats"}}
        print(json.dumps(out, indent=2, default=str))
    else:
        print(_format_table(schedule, area, summaries))
        if data_rep is not None:
            print("\n" + format_data_report(data_rep, args.data))
        print("\n" + RECOMMENDATION)
        if args.plot:
            print(f"\nplot written to {args.plot}")
    return 0


# What to start with, from the regime study (README "Regime study"; the figure is
# docs/regimes_fmnist_latent_long_speedup.png, the records benchmarks/results/regimes/).
RECOMMENDATION = (
    "start with: speed+uncertainty (SpeeD's sampling with EDM2's learned per-t uncertainty weighting, "
    "`--strategy speed+uncertainty`) for latent DiT training. In the regime study's 6,000-step latent "
    "Fashion-MNIST run (DiT-mini) it reached uniform's 6,000-step score 3.00x [2.82, 3.13] sooner (2 seeds) "
    "and was ahead of every fixed strategy at every target; in pixel Fashion-MNIST and digits 2.29x and "
    "2.51x (3 seeds). Its u trains with the model's optimizer (the engine adds it; in your own loop pass "
    "loss_fn.parameters(device)). With no learned state: speed+p2 (2.73x [2.59, 3.04] at 6,000 steps, "
    "3 seeds). README 'Regime study', docs/regimes_fmnist_latent_long_speedup.png."
)


def add_analyze_command(subparsers: Any, data_loader=None) -> argparse.ArgumentParser:
    """Register ``analyze`` on an argparse subparsers object; its ``func`` returns 0.
    ``data_loader(spec) -> array`` reads ``--data`` dataset names (the application passes one;
    without it only .npy/.npz files are read)."""
    p = subparsers.add_parser(
        "analyze",
        help="show the time-step areas of a schedule and what strategies do there",
        description=(
            "The SpeeD time-step analysis: the acceleration / deceleration / convergence areas of a noise "
            "schedule (t_ad, tau, mirror pivot) and, for each strategy, the share of samples and the loss "
            "weights in each area. --plot draws the curves and the strategies' P(t) and w(t)."
        ),
    )
    p.add_argument("--schedule", default="linear", choices=_SCHEDULES, help="noise schedule (default linear)")
    p.add_argument("--T", type=int, default=1000, help="number of diffusion steps (default 1000)")
    p.add_argument("--zero-snr", action="store_true", help="rescale the schedule to zero terminal SNR")
    p.add_argument("--strategy", action="append", metavar="NAME",
                   help="strategy to show, NAME or NAME:KEY=VALUE,KEY=VALUE (repeatable, so variants can be "
                        "compared; 'a+b' combines a's sampling with b's weights); default: uniform and speed")
    p.add_argument("--param", action="append", metavar="[STRATEGY:]KEY=VALUE",
                   help="strategy parameter, e.g. k=5 or speed:tau=auto (repeatable; without a prefix it "
                        "applies to every chosen strategy)")
    p.add_argument("--prediction", default=None, choices=("eps", "v", "x0"),
                   help="target the weights are for (default eps; v with --path flow)")
    p.add_argument("--path", default="ddpm", choices=("ddpm", "flow"),
                   help="ddpm (default): the schedule's areas; flow: flow matching over sigma (flow strategies)")
    p.add_argument("--data-std", type=float, default=None, help="--path flow: the data's std (default 1)")
    p.add_argument("--step", type=int, default=0, help="training step for dynamic strategies (clts); default 0")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch size for the mirror's exact effective distribution (default: large-batch limit)")
    p.add_argument("--plot", metavar="FILE.png", help="write the picture to this file")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--data", metavar="SPEC", help="also estimate where the convergence area starts for this data "
                   "(digits | fashion-mnist | latents:PATH | a folder | .npy/.npz): a data-aware tau and k")
    p.set_defaults(func=_run_analyze, data_loader=data_loader)
    return p


# What a command line reports as "error: <one line>" with exit status 2 instead of a traceback.
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, OSError, RuntimeError, ZeroDivisionError)


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (a KeyError's key without the quotes repr adds)."""
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    text = " ".join(str(msg).split())
    return text or type(exc).__name__


class OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors on one line (``prog: error: ...``, exit status 2)."""

    def error(self, message):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m speed_kernels.analysis``: the analyze command alone."""
    parser = OneLineParser(prog="speed-kernels")
    sub = parser.add_subparsers(dest="command")
    sub.required = True
    add_analyze_command(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        print(f"speed-kernels analyze: error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
