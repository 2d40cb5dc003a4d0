"""The files a comparison writes: results.md (provenance and the table), results.csv, results.json
and the plot quality_vs_steps.png (each metric against the training step, the floor dashed).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

__all__ = ["METRIC_NAMES", "fmt", "markdown_table", "write_results", "plot_curves"]

METRIC_NAMES = {"fd": "classifier Frechet distance", "mmd2": "pixel MMD^2", "swd": "pixel sliced W2",
                "fid": "Inception FID"}


def fmt(v, digits=4):
    if v is None:
        return "n/a"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}g}"


def markdown_table(rows, metric, evaluator, has_ref, n_seeds) -> str:
    others = [m for m in evaluator.metric_names if m != metric]
    head = [f"strategy", f"final {metric}" + (" (mean ± sd)" if n_seeds > 1 else ""), f"best {metric}"]
    if has_ref:
        head += ["steps to uniform's final", "speed-up"]
    head += [f"final {m}" for m in others] + ["final loss", "steps/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        final = fmt(r["final"]) + (f" ± {fmt(r['final_std'], 2)}" if r.get("final_std") is not None else "")
        cells = [r["strategy"], final, fmt(r["best"])]
        if has_ref:
            b = r["speedup_bound"]
            if r["steps_to_target"] is None:
                cells += ["not reached", "not reached"]
            elif b == "?":
                cells += [f"<= {r['steps_to_target']:.0f}", "? (both at the first eval)"]
            else:
                first = b == ">="  # the strategy's step is the first evaluation: an upper bound
                cells += [("<= " if first else "") + f"{r['steps_to_target']:.0f}",
                          (f"{b} " if b else "") + f"{r['speedup']:.2f}x"]
        cells += [fmt(r[f"final_{m}"]) for m in others]
        cells += [fmt(r["final_loss"]), fmt(r["steps_per_s"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    fl = evaluator.floor
    cells = ["real vs real (floor)", fmt(fl[metric]), "", *([""] * (2 if has_ref else 0)),
             *[fmt(fl[m]) for m in others], "", ""]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out: Path, result: dict) -> dict:
    meta, metric = result["meta"], result["metric"]
    cfg = meta["config"]
    files = {}
    what = (f"{METRIC_NAMES.get(metric, metric)} ({metric}, lower is better) of {cfg['eval_samples']} samples "
            f"({cfg['sampler']}, {cfg['sample_steps']} steps, EMA weights) against {meta['evaluator']['n_ref']} "
            f"real images, after {cfg['steps']} training steps; mean over seeds {cfg['seeds']}")
    ev = meta["evaluator"]
    clf = ev.get("classifier") or {}
    objective = cfg.get("objective", "diffusion")
    # what the strategies act on: the DDPM schedule, or the flow path (no schedule; sigma in [0, 1])
    path = (f"objective flow (rectified flow, x_t = (1 - sigma) x0 + sigma eps, flow strategies)"
            if objective == "flow" else f"objective diffusion, {cfg['schedule']} schedule")
    lines = [
        f"# Strategy comparison: {cfg['data']}, {cfg['model']}, {objective}, sampler {cfg['sampler']}",
        "",
        f"- produced by: `{meta['command']}` ({meta['produced_by']})",
        f"- date: {meta['date']}; machine: {meta['machine']}; device: {meta['device']}",
        f"- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + f"; git {meta['git_commit']}",
        f"- SPEED_* environment: {json.dumps(meta.get('numerics_env') or {})}",
        f"- training: {path}, {cfg['steps']} steps, batch {cfg['batch_size']}, lr {cfg['lr']}, "
        f"{cfg['prediction']}-prediction{', learned sigma' if cfg['learn_sigma'] else ''}, seeds {cfg['seeds']}",
        f"- score: {what}; evaluated every {cfg['eval_every']} steps",
        f"- classifier for fd: {clf.get('arch')} trained {clf.get('epochs')} epochs "
        f"(train accuracy {fmt(clf.get('train_accuracy'))}), cached key {clf.get('key')}" if clf else "- no classifier",
        f"- speed-up = (steps for uniform to reach its final {metric}) / (steps for the strategy to first reach it), "
        "linear interpolation between evaluations on the mean curve; a step reached already at the first evaluation "
        "is an upper bound ('<= N'), making the ratio a bound ('>=' or '<='), or unknown ('?') when both are",
        f"- wall time: {meta['wall_time_s']} s",
        "",
        result["markdown_table"],
        "",
    ]
    p = out / "results.md"
    p.write_text("\n".join(lines))
    files["markdown"] = str(p)

    p = out / "results.csv"
    with open(p, "w", newline="") as f:
        f.write(f"# produced by: {meta['command']}\n# date: {meta['date']}; machine: {meta['machine']}; "
                f"device: {meta['device']}\n# versions: {json.dumps(meta['versions'])}; git {meta['git_commit']}\n"
                f"# SPEED_* environment: {json.dumps(meta.get('numerics_env') or {})}\n"
                f"# training: objective {objective}, {cfg['prediction']}-prediction, sampler {cfg['sampler']}\n"
                f"# score: {what}\n")
        keys = ["strategy", "final", "final_std", "best", "steps_to_target", "speedup", "speedup_bound",
                "target", "uniform_steps"] + [f"final_{m}" for m in ev["floor"] if m != "n"] + ["final_loss", "steps_per_s"]
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in result["rows"]:
            w.writerow({k: r.get(k) for k in keys})
        w.writerow({"strategy": "real vs real (floor)", "final": ev["floor"][metric],
                    **{f"final_{m}": v for m, v in ev["floor"].items() if m != "n"}})
    files["csv"] = str(p)

    p = out / "results.json"
    with open(p, "w") as f:
        json.dump({k: result[k] for k in ("meta", "metric", "reference", "rows", "curves", "runs")}, f, indent=2,
                  default=str)
    files["json"] = str(p)

    files["plot"] = plot_curves(out / "quality_vs_steps.png", result)
    return files


def plot_curves(path: Path, result: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, metric = result["meta"], result["metric"]
    cfg, floor = meta["config"], meta["evaluator"]["floor"]
    metrics = [metric] + [m for m in ("mmd2", "swd", "fd") if m != metric and m in floor][:1]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), dpi=120, squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for label, c in result["curves"].items():
            s = np.array(c["steps"])
            line, = ax.plot(s, c[f"{m}_mean"], marker="o", ms=3, lw=1.5, label=label)
            if len(cfg["seeds"]) > 1:
                ax.fill_between(s, c[f"{m}_min"], c[f"{m}_max"], color=line.get_color(), alpha=0.15, lw=0)
        ax.axhline(floor[m], color="k", ls="--", lw=1, label="real vs real (floor)")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{m} (lower is better)")
        if m != "mmd2":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.set_title(f"{METRIC_NAMES.get(m, m)}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    spread = f", band: min-max over seeds {cfg['seeds']}" if len(cfg["seeds"]) > 1 else f", seed {cfg['seeds'][0]}"
    fig.suptitle(f"{cfg['data']}, {cfg['model']}, {cfg.get('objective', 'diffusion')}, batch {cfg['batch_size']}: {cfg['eval_samples']} samples, "
                 f"{cfg['sampler']}-{cfg['sample_steps']}{spread}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)
