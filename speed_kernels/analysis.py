"""The time-step analysis of SpeeD (Wang et al. 2024, Section 2 and Theorem 1), and the
``speed-kernels analyze`` command.

The process increment between neighbouring steps, δ_t = x_{t+1} - x_t given x0, is treated as
the paper's Theorem 1 does: a Gaussian increment independent of x_t, so that the marginal
variances add up, Var(x_{t+1}) = Var(x_t) + Var(δ_t). Then

    δ_t ~ N((√ᾱ_{t+1} - √ᾱ_t)·x0, (ᾱ_t - ᾱ_{t+1})·I),

the mean coefficient is the step of √ᾱ and the variance is the step of the process variance
1 - ᾱ_t: the increment variance *is* the rate of change of the noise variance. (The one-step
Markov kernel x_{t+1} = √α_{t+1}·x_t + √β_{t+1}·ε gives another variance, dominated by β_{t+1}
and increasing to the end, with no interior peak: it does not reproduce the paper's areas; it is
available as ``increment_variance(schedule, kind="markov")``.)

Areas along t (half-open intervals):

- acceleration [0, t_ad): the increment variance grows;
- deceleration [t_ad, τ): it shrinks;
- convergence [τ, T): the process has nearly reached pure noise; increments are tiny.

``t_ad`` is the peak of ∂_t(1 - ᾱ_t), computed with numpy.gradient (central differences), which is
the increment variance up to the half-step shift and exactly the g of SpeeD's change-aware
weighting, so the CAW weight peaks at t_ad: 219 on the linear schedule (the forward difference
ᾱ_t - ᾱ_{t+1} peaks at 218, the increment from 218 to 219).

``tau`` (τ): the rule is 1 + the first t at which the rate of change of the noise standard
deviation per unit of *normalised* time, T·∂_t√(1 - ᾱ_t) (numpy.gradient), falls below 0.05.
On T = 1000 this is the official code's ∂_t√(1 - ᾱ_t) < 5e-5 and gives exactly 700 on the linear
schedule. Why this rule: √(1 - ᾱ_t) runs from ≈0 to ≈1 on every schedule, so a threshold on its
derivative with respect to t/T ∈ [0, 1] is dimensionless and independent of T (linear β with
DiT's 1000/T scaling gives τ ≈ 0.7·T for T = 250 and T = 4000 alike). A threshold relative to the
derivative's peak is not: that peak sits at t = 0 and is set by the √ singularity and β_start,
so the same relative threshold moves τ with T and β_start. Values (T = 1000): linear t_ad 219,
τ 700, pivot 642; scaled_linear t_ad 313, τ 944, pivot 866; cosine t_ad 495, τ 980, pivot 959.
The cosine and scaled-linear schedules reach pure noise later, so their convergence area is
short: SpeeD's τ = 700 default is a linear-schedule number, use ``tau="auto"`` elsewhere.

``pivot``: the official SpeeD mirror pivot, 1 + the first t with ∂_t√(1 - ᾱ_t) < 1e-4 (per step at
T = 1000; 0.1 per unit of normalised time in general), clamped to [0, T-1]: 642 on linear.

Every curve is returned as a float64 numpy array.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from speed_kernels.schedules import NoiseSchedule

__all__ = [
    "noise_std",
    "noise_std_rate",
    "marginal_variance",
    "marginal_variance_rate",
    "increment_mean_coef",
    "increment_variance",
    "increment_mean_coef_rate",
    "increment_variance_rate",
    "mirror_pivot",
    "areas",
    "area_shares",
    "strategy_summary",
    "make_schedule",
    "plot_analysis",
    "add_analyze_command",
    "TAU_THRESHOLD",
    "PIVOT_THRESHOLD",
]

#: τ rule: T·∂_t√(1-ᾱ_t) below this (per unit of normalised time) starts the convergence area.
TAU_THRESHOLD = 0.05
#: Mirror pivot rule of the official code (1e-4 per step at T = 1000), per unit of normalised time.
PIVOT_THRESHOLD = 0.1

AREA_NAMES = ("acceleration", "deceleration", "convergence")


def _check(schedule: Any) -> NoiseSchedule:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    return schedule


# ---------------------------------------------------------------------------- curves
def noise_std(schedule: NoiseSchedule) -> np.ndarray:
    """√(1 - ᾱ_t), [T]."""
    return _check(schedule).numpy("sqrt_one_minus_alphas_cumprod")


def noise_std_rate(schedule: NoiseSchedule, normalized: bool = False) -> np.ndarray:
    """∂_t√(1 - ᾱ_t) by numpy.gradient, [T]; per unit of t/T (×T) when ``normalized``."""
    g = np.gradient(noise_std(schedule))
    return g * schedule.T if normalized else g


def marginal_variance(schedule: NoiseSchedule) -> np.ndarray:
    """Var(x_t | x0) per element: 1 - ᾱ_t, [T]."""
    return 1.0 - _check(schedule).numpy("alphas_cumprod")


def marginal_variance_rate(schedule: NoiseSchedule) -> np.ndarray:
    """∂_t(1 - ᾱ_t) by numpy.gradient, [T] (SpeeD's CAW g; its peak is t_ad)."""
    return np.gradient(marginal_variance(schedule))


def increment_mean_coef(schedule: NoiseSchedule) -> np.ndarray:
    """Mean coefficient of δ_t = x_{t+1} - x_t given x0: √ᾱ_{t+1} - √ᾱ_t (≤ 0), [T-1] for t = 0..T-2."""
    s = _check(schedule).numpy("sqrt_alphas_cumprod")
    return s[1:] - s[:-1]


def increment_variance(schedule: NoiseSchedule, kind: str = "additive") -> np.ndarray:
    """Variance of δ_t = x_{t+1} - x_t given x0, [T-1] for t = 0..T-2.

    ``kind="additive"`` (Theorem 1, the paper's analysis): ᾱ_t - ᾱ_{t+1}.
    ``kind="markov"`` (the one-step chain x_{t+1} = √α_{t+1}x_t + √β_{t+1}ε):
    (1 - √α_{t+1})²(1 - ᾱ_t) + β_{t+1}."""
    abar = _check(schedule).numpy("alphas_cumprod")
    if kind == "additive":
        return abar[:-1] - abar[1:]
    if kind == "markov":
        a_next = schedule.numpy("alphas")[1:]
        return (1.0 - np.sqrt(a_next)) ** 2 * (1.0 - abar[:-1]) + (1.0 - a_next)
    raise ValueError(f"kind must be 'additive' or 'markov', got {kind!r}")


def increment_mean_coef_rate(schedule: NoiseSchedule) -> np.ndarray:
    """∂_t of :func:`increment_mean_coef` (numpy.gradient), [T-1]."""
    return np.gradient(increment_mean_coef(schedule))


def increment_variance_rate(schedule: NoiseSchedule, kind: str = "additive") -> np.ndarray:
    """∂_t of :func:`increment_variance` (numpy.gradient), [T-1]; crosses 0 at t_ad."""
    return np.gradient(increment_variance(schedule, kind))


# ---------------------------------------------------------------------------- areas
def _first_below(rate: np.ndarray, thr: float) -> Optional[int]:
    below = np.flatnonzero(rate < thr)
    return int(below[0]) if below.size else None


def mirror_pivot(schedule: NoiseSchedule, threshold: float = PIVOT_THRESHOLD) -> int:
    """The official SpeeD mirror pivot: 1 + first t with T·∂_t√(1-ᾱ_t) < threshold (i.e.
    ∂_t√(1-ᾱ_t) < 1e-4 at T = 1000), clamped to [0, T-1] so that |t - m| stays a valid step;
    T-1 if the rate never falls below the threshold. 642 on the linear schedule."""
    first = _first_below(noise_std_rate(schedule, normalized=True), threshold)
    T = schedule.T
    return T - 1 if first is None else min(first + 1, T - 1)


def areas(schedule: NoiseSchedule, tau_threshold: float = TAU_THRESHOLD,
          pivot_threshold: float = PIVOT_THRESHOLD) -> Dict[str, Any]:
    """The three areas of the paper for this schedule (see the module docstring for the rules).

    Returns ``{"T", "t_ad", "tau", "pivot", "acceleration": [0, t_ad], "deceleration": [t_ad, tau],
    "convergence": [tau, T], "rule": {...}}`` (intervals half-open). τ = T (empty convergence area)
    if the rate never falls below the threshold."""
    _check(schedule)
    T = schedule.T
    t_ad = int(np.argmax(marginal_variance_rate(schedule)))
    first = _first_below(noise_std_rate(schedule, normalized=True), tau_threshold)
    tau = T if first is None else min(first + 1, T)
    return {
        "schedule": schedule.name,
        "T": T,
        "t_ad": t_ad,
        "tau": int(tau),
        "pivot": mirror_pivot(schedule, pivot_threshold),
        "acceleration": [0, t_ad],
        "deceleration": [t_ad, int(tau)],
        "convergence": [int(tau), T],
        "rule": {
            "t_ad": "argmax_t numpy.gradient(1 - alphas_cumprod)",
            "tau": "1 + first t with T * numpy.gradient(sqrt(1 - alphas_cumprod)) < tau_threshold",
            "tau_threshold": float(tau_threshold),
            "pivot": "1 + first t with T * numpy.gradient(sqrt(1 - alphas_cumprod)) < pivot_threshold",
            "pivot_threshold": float(pivot_threshold),
        },
    }


def area_shares(probs: Any, area: Dict[str, Any]) -> Dict[str, float]:
    """Probability mass of ``probs`` in each area."""
    p = np.asarray(probs, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(p)])
    t_ad, tau, T = area["t_ad"], area["tau"], area["T"]
    lo = min(t_ad, tau)
    return {
        "acceleration": float(c[lo] - c[0]),
        "deceleration": float(c[tau] - c[lo]),
        "convergence": float(c[T] - c[tau]),
    }


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
    from speed_kernels import strategies as S

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


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _parse_params(items: Sequence[str], strategy_names: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """``[STRATEGY:]KEY=VALUE`` items → params per strategy (no prefix: every chosen strategy)."""
    out: Dict[str, Dict[str, Any]] = {n: {} for n in strategy_names}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--param must look like [STRATEGY:]KEY=VALUE, got {item!r}")
        key, _, val = item.partition("=")
        target, _, key = key.rpartition(":")
        if not key:
            raise ValueError(f"--param must look like [STRATEGY:]KEY=VALUE, got {item!r}")
        if target and target not in out:
            raise ValueError(f"--param {item!r} names strategy {target!r}, which is not among --strategy {list(out)}")
        for n in ([target] if target else out):
            out[n][key] = _parse_value(val)
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
    schedule = make_schedule(args.schedule, args.T, args.zero_snr)
    area = areas(schedule)
    entries = list(args.strategy) if args.strategy else ["uniform", "speed"]
    from speed_kernels import strategies as S

    names, inline = [], []
    for e in entries:  # NAME or NAME:KEY=VALUE,KEY=VALUE
        n, _, rest = e.partition(":")
        names.append(n)
        inline.append(_parse_params([f"{kv}" for kv in rest.split(",") if kv], [n])[n] if rest else {})
    params = _parse_params(args.param or [], list(dict.fromkeys(names)))
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

        data_rep = data_areas(load_data_array(args.data), schedule)
    if args.json:
        out = {
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
        if args.plot:
            print(f"\nplot written to {args.plot}")
    return 0


def add_analyze_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``analyze`` on an argparse subparsers object; its ``func`` returns 0."""
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
    p.add_argument("--prediction", default="eps", choices=("eps", "v", "x0"), help="target the weights are for")
    p.add_argument("--step", type=int, default=0, help="training step for dynamic strategies (clts); default 0")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch size for the mirror's exact effective distribution (default: large-batch limit)")
    p.add_argument("--plot", metavar="FILE.png", help="write the picture to this file")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--data", metavar="SPEC", help="also estimate where the convergence area starts for this data "
                   "(digits | fashion-mnist | latents:PATH | a folder | .npy/.npz) and recommend tau and k")
    p.set_defaults(func=_run_analyze)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m speed_kernels.analysis``: the analyze command alone."""
    parser = argparse.ArgumentParser(prog="speed-kernels")
    sub = parser.add_subparsers(dest="command")
    sub.required = True
    add_analyze_command(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, TypeError) as exc:
        print(f"speed-kernels analyze: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
