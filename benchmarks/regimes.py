"""Where does the speed-up hold? The regime study of issue 13, built on `speed-kernels compare`.

    python benchmarks/regimes.py --smoke                      # a tiny slice, about 2 CPU minutes
    python benchmarks/regimes.py --regimes digits-pixel --seeds 0,1,2 --threads 1
    python benchmarks/regimes.py --regimes fmnist-pixel,fmnist-latent --profile gpu --device cuda

For every regime, strategy and seed one model is trained (compare's setting: same data, model,
initial weights, data order and loss random stream for every strategy of a seed) and scored every
``eval_every`` steps with *each* sampler (default DDPM-250, the paper's, and DDIM-50) on the same
fixed evaluator and starting noise. Regimes:

- ``digits-pixel``: scikit-learn's 8x8 digits in pixel space, unet-tiny, ε-prediction;
- ``fmnist-pixel``: Fashion-MNIST padded to 32x32 in pixel space, ε-prediction; unet-small on the
  GPU profile; on the CPU profile DiT-mini/4 (the latent regime's DiT-mini with patch 4: 64 tokens
  of 4x4 pixels), 1,000 steps at lr 1e-3, ~8.5 min a run on one core. A U-Net does not fit: unet-tiny
  trains at 0.65-1 steps/s at 32x32 and one DDPM-250 evaluation of a 16-channel U-Net takes 5 min.
  Same model family as the latent regime, so the two differ in the representation only;
- ``fmnist-latent``: Fashion-MNIST through a small KL autoencoder (``speed-kernels encode``,
  4x8x8 latents scaled to unit std, made on first use under ``--latents``), DiT with learned σ
  (DiT's hybrid loss), samples decoded before scoring (the paper's regime at small scale; DiT-mini
  at lr 1e-3 on the CPU profile, DiT-S/2 at the trainer's default on the GPU's);

Profiles: ``cpu`` (a run of any regime fits a 2-core machine in under 10 minutes, one core per run; fewer steps, small models) and ``gpu`` (longer schedules, DiT-S/2 in
the latent regime). ``--smoke`` runs the digits
regimes on a tiny slice (2 strategies, 2 seeds, a few steps, short samplers) to check the pipeline.

Outputs under ``--out`` (default benchmarks/results/regimes/): ``results.csv`` with one row per
evaluation and metric (columns regime, strategy, sampler, seed, step, metric, value), ``summary.md``
and ``summary.json`` (per regime and sampler: final score mean ± sd over seeds, steps to reach the
uniform run's final score, the speed-up with a paired bootstrap 95 % interval over seeds, the
real-vs-real floor, the reconstruction floor of the latent regime and the data-aware τ of
``speed-kernels analyze --data``), ``<regime>_<sampler>.png`` quality-vs-steps plots and the per-run
logs (metrics.jsonl) under ``runs/``. A run whose record is already in ``runs/`` with identical
settings is read back, so the study can be stopped and continued.

`speed:tau=data` is SpeeD with the tau that ``speed-kernels analyze --data`` predicts for the
regime's training data (resolved per regime): set beside `speed` (tau 700), it checks the
prediction against the runs.

Speed-up: S_u / S_s on the mean curve over seeds (speed_train.compare.speedup): S_u the first step
where uniform reaches its own final score, S_s the first step where the strategy reaches it (linear
interpolation; "not reached" counts as speed-up 0 in the bootstrap). The bootstrap resamples seeds
with replacement, the same seeds for uniform and the strategy (they share initial weights and data
order), and reports the 2.5 / 97.5 percentiles.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "python"):  # runnable from a checkout without `pip install -e .`
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from speed_train.compare import _provenance, _safe, parse_strategies, speedup  # noqa: E402

# the strategies of issue 13: uniform, SpeeD (code), SpeeD (paper), SpeeD sampling + P2 weights, P2,
# Min-SNR, log-normal, logit-normal, importance, adaptive (both progress measures)
STUDY_STRATEGIES = ("uniform,speed,speed:variant=paper,speed:tau=data,speed+p2,p2,min-snr,lognormal,logit-normal,"
                    "importance,adaptive,adaptive:relative=false")
# `tau=data` is replaced per regime by the tau that `speed-kernels analyze --data` predicts for that
# regime's training data: the run that checks the prediction against SpeeD's default tau
# On the CPU a DDPM-250 curve costs more than the training it scores: DDIM-50 gives the curve (and
# the speed-up), DDPM-250 (the paper's sampler) scores the final step only ("@final").
SAMPLERS = {"cpu": "ddim-50,ddpm-250@final", "gpu": "ddpm-250,ddim-50"}
CSV_COLUMNS = ["regime", "strategy", "sampler", "seed", "step", "metric", "value"]

REGIMES = {
    "digits-pixel": {
        "data": "digits", "learn_sigma": False,
        "cpu": dict(model="unet-tiny", steps=1500, eval_every=300, batch_size=64, eval_samples=400),
        "gpu": dict(model="unet-tiny", steps=10000, eval_every=1000, batch_size=128, eval_samples=1000),
    },
    "fmnist-pixel": {
        "data": "fashion-mnist", "learn_sigma": False,
        "cpu": dict(model="DiT-mini/4", steps=1000, eval_every=250, batch_size=64, eval_samples=300, lr=1e-3),
        "gpu": dict(model="unet-small", steps=20000, eval_every=2000, batch_size=128, eval_samples=2000),
    },
    "fmnist-latent": {
        "data": "latents:{latents}", "learn_sigma": True, "encode_from": "fashion-mnist",
        # lr 1e-3, as the digits regime trains (the trainer's choice for tiny models): 1,500 steps at
        # DiT's 1e-4 cover only the first sliver of the learning curve (uniform FD 443 -> 376)
        "cpu": dict(model="DiT-mini", steps=1500, eval_every=250, batch_size=64, eval_samples=500, lr=1e-3),
        "gpu": dict(model="DiT-S/2", steps=20000, eval_every=2000, batch_size=128, eval_samples=2000),
    },
    # issue 20: the latent regime's CPU profile as it is, trained 4x longer (evaluated every 500 steps),
    # to read the speed-up as a function of the target; same latents folder as fmnist-latent
    "fmnist-latent-long": {
        "data": "latents:{latents}", "learn_sigma": True, "encode_from": "fashion-mnist",
        "cpu": dict(model="DiT-mini", steps=6000, eval_every=500, batch_size=64, eval_samples=500, lr=1e-3),
    },
    # the smoke regimes: digits, tiny
    "smoke-digits-pixel": {
        "data": "digits", "learn_sigma": False,
        "cpu": dict(model="unet-tiny", steps=12, eval_every=6, batch_size=16, eval_samples=48),
    },
    "smoke-digits-latent": {
        "data": "latents:{latents}", "learn_sigma": True, "encode_from": "digits",
        "encode": dict(downsample=2, width=16, steps=200, batch_size=64, lr=1e-2, eval_samples=200),
        "cpu": dict(model="DiT-tiny", steps=12, eval_every=6, batch_size=16, eval_samples=48),
    },
}
SMOKE = dict(regimes="smoke-digits-pixel,smoke-digits-latent", seeds="0,1",
             strategies="uniform,speed,adaptive:fast_steps=2,slow_steps=6,warmup_steps=4,every=2",
             samplers="ddim-4,ddpm-8@final")


def parse_samplers(spec: str) -> list[tuple[str, int, bool]]:
    """``"ddim-50,ddpm-250@final"`` -> [("ddim", 50, False), ("ddpm", 250, True)]: name, sampling
    steps, and whether the sampler scores the final training step only (no curve, no speed-up)."""
    out = []
    for tok in str(spec).split(","):
        tok = tok.strip()
        if not tok:
            continue
        body, at, when = tok.partition("@")
        name, _, steps = body.partition("-")
        if name not in ("ddpm", "ddim") or not steps.isdigit() or int(steps) < 1 or (at and when != "final"):
            raise ValueError(f"--samplers entries must be ddpm-N or ddim-N, optionally with @final, got {tok!r}")
        out.append((name, int(steps), bool(at)))
    if out and all(final for _, _, final in out):
        raise ValueError("--samplers needs at least one sampler without @final (the curve the speed-up is read on)")
    if not out:
        raise ValueError("--samplers is empty")
    return out


def _regime_specs(strategies: str, tau_data: int) -> list:
    """The strategies of one regime: ``tau=data`` becomes the data-aware tau of the analysis
    (speed_kernels.data_analysis); the label keeps ``tau=data`` so regimes line up."""
    literal = f"tau={int(tau_data)}"
    pattern = re.compile(re.escape(literal) + r"(?![0-9])")
    if "tau=data" in strategies and pattern.search(strategies):
        raise ValueError(f"--strategies holds both tau=data and the literal {literal}: they would be one run")
    resolved = parse_strategies(strategies.replace("tau=data", literal))
    return [(pattern.sub("tau=data", label), name, params) for label, name, params in resolved]


def _sampler_key(sampler: tuple[str, int, bool]) -> str:
    name, steps, final_only = sampler
    return f"{name}-{steps}" + ("@final" if final_only else "")


def bootstrap_speedup(steps, uniform_per_seed, strat_per_seed, *, n_boot: int = 1000, seed: int = 0):
    """Paired bootstrap over seeds of the speed-up read on mean curves: (low, high) 2.5 / 97.5
    percentiles and the share of resamples in which the strategy reached uniform's final score.
    A resample that does not reach it counts as speed-up 0."""
    u = np.asarray(uniform_per_seed, dtype=np.float64)
    s = np.asarray(strat_per_seed, dtype=np.float64)
    if u.shape != s.shape or u.ndim != 2:
        raise ValueError(f"per-seed curves must be [seeds, evals] of one shape, got {u.shape} and {s.shape}")
    rng = np.random.default_rng(seed)
    vals = np.empty(n_boot)
    for i in range(n_boot):
        idx = rng.integers(0, u.shape[0], u.shape[0])
        r = speedup((steps, u[idx].mean(0)), (steps, s[idx].mean(0)))
        vals[i] = 0.0 if r["speedup"] is None else r["speedup"]
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5)), float(np.mean(vals > 0))


def _evaluator(data: str, **kw):
    from speed_train.metrics import Evaluator

    if data.startswith("latents:"):
        from speed_train.autoencoder import latent_evaluator

        return latent_evaluator(data, **kw)
    return Evaluator.for_dataset(data, **kw)


def _ensure_latents(regime: dict, folder: Path, say) -> None:
    if (folder / "latents.npz").exists() and (folder / "autoencoder.pt").exists():
        return
    from speed_train.autoencoder import encode_dataset

    say(f"regimes: no latents under {folder}: running encode on {regime['encode_from']}")
    encode_dataset(regime["encode_from"], folder, verbose=False, **regime.get("encode", {}))


def run_study(*, regimes: str, strategies: str = STUDY_STRATEGIES, seeds: str = "0,1,2", samplers: str | None = None,
              profile: str = "cpu", out: str | Path = ROOT / "benchmarks" / "results" / "regimes",
              latents: str | Path | None = None, device: str = "cpu", threads: int | None = 1,
              steps: int | None = None, eval_every: int | None = None, eval_samples: int | None = None,
              n_boot: int = 1000, eval_seed: int = 12345, command: str | None = None, verbose: bool = True,
              report_only: bool = False, train_only: str | None = None) -> dict:
    import torch

    from speed_train.sampling import save_grid
    from speed_train.trainer import TrainConfig, Trainer

    say = print if verbose else (lambda *a, **k: None)
    names = [r.strip() for r in regimes.split(",") if r.strip()]
    for r in names:
        if r not in REGIMES:
            raise ValueError(f"unknown regime {r!r}; known: {', '.join(REGIMES)}")
        if profile not in REGIMES[r]:
            raise ValueError(f"regime {r!r} has no {profile!r} profile")
    specs = _regime_specs(strategies, 1)  # validates every name and parameter before any training
    if not any(name == "uniform" and not params for _, name, params in specs):
        raise ValueError("--strategies must include plain 'uniform': the speed-up is read against it")
    # --train-only: the labels this invocation may train; the others are read back if recorded (so two
    # processes can share a study without both training uniform)
    trainable = None if train_only is None else {t.strip() for t in train_only.split(",") if t.strip()}
    if trainable is not None and not trainable <= {label for label, _, _ in specs} | {"tau=data"}:
        raise ValueError(f"--train-only names strategies not in --strategies: {sorted(trainable)}")
    seed_list = [int(s) for s in str(seeds).split(",") if s.strip()]
    if len(seed_list) < 1 or len(set(seed_list)) != len(seed_list):
        raise ValueError(f"--seeds must be distinct integers, got {seeds!r}")
    sampler_list = parse_samplers(samplers or SAMPLERS[profile])
    if threads:
        torch.set_num_threads(int(threads))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    latents = Path(latents) if latents else out / "latents"
    t0 = time.perf_counter()
    rows: list[dict] = []
    summary: dict = {"regimes": {}}

    for rname in names:
        reg = REGIMES[rname]
        prof = dict(reg[profile])
        for key, val in (("steps", steps), ("eval_every", eval_every), ("eval_samples", eval_samples)):
            if val is not None:
                prof[key] = int(val)
        data = reg["data"]
        if data.startswith("latents:"):
            folder = latents / f"{reg['encode_from']}{'-smoke' if 'encode' in reg else ''}"
            _ensure_latents(reg, folder, say)
            data = f"latents:{folder}"
        say(f"regimes: {rname}: {data}, {prof}, samplers {sampler_list}")
        evaluator = _evaluator(data, n_samples=prof["eval_samples"], device=device)
        metric = "fid" if "fid" in evaluator.metric_names else ("fd" if "fd" in evaluator.metric_names else "mmd2")
        floor = json.loads(json.dumps(evaluator.floor))
        if report_only:
            # the feature classifier is trained on the machine that scores (cached per machine); its
            # weights, hence every score and the floor, differ across CPU kinds (Intel vs AMD moved the
            # digits floor 8.920 -> 8.917). A report reads the records with the floor they were scored
            # against: uniform's, the reference of every speed-up
            recorded = _recorded_floor(out / "runs" / rname, seed_list)
            if recorded is not None and recorded != floor:
                say(f"regimes: {rname}: the records were scored by another machine's feature network (floor "
                    f"{metric} {recorded[metric]:.6g}, here {floor[metric]:.6g}); reporting them with theirs "
                    "(runs trained here would not be comparable with them)")
                floor = recorded
        # the data-aware analysis of the training data (what the model sees): is SpeeD's tau right here?
        from speed_kernels.data_analysis import data_areas
        from speed_train.data import load_dataset
        from speed_train.trainer import make_schedule

        prediction = data_areas(load_dataset(data, flip=False).images, make_schedule("linear", 1000))
        prediction.pop("info_nats")
        curves: dict = {}
        for seed in seed_list:
            for label, name, params in _regime_specs(strategies, prediction["tau_data"]):
                run_dir = out / "runs" / rname / f"{_safe(label)}-seed{seed}"
                cfg = TrainConfig(model=prof["model"], data=data, strategy=name, strategy_params=dict(params),
                                  steps=prof["steps"], batch_size=prof["batch_size"], lr=prof.get("lr"),
                                  learn_sigma=reg["learn_sigma"], seed=seed, device=device, out=str(run_dir),
                                  name=f"{_safe(label)}-seed{seed}",
                                  log_every=min(50, prof["eval_every"]), sample_every=0, ckpt_every=0, sample_n=0,
                                  progress=False, threads=threads)
                config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "name", "progress")}
                # the latents by their folder's name, not its absolute path: records stay valid in any checkout
                config["data"] = "latents:" + Path(data[len("latents:"):]).name if data.startswith("latents:") else data
                signature = json.loads(json.dumps({
                    "config": config,
                    "eval_every": prof["eval_every"], "eval_samples": prof["eval_samples"], "samplers": sampler_list,
                    "eval_seed": eval_seed, "floor": floor}, default=str))
                record = run_dir / "evals.json"
                if record.exists() and json.loads(record.read_text()).get("signature") == signature:
                    evals = json.loads(record.read_text())["evals"]
                    say(f"  reusing {rname} {label} seed {seed}")
                elif report_only or (trainable is not None and label not in trainable):
                    say(f"  no record of {rname} {label} seed {seed} with these settings (not run here)")
                    continue
                else:
                    evals = []

                    def eval_fn(trainer, step, _evals=evals, _dir=run_dir, _steps=prof["steps"], _label=label,
                                _seed=seed):
                        res = {}
                        for sname, ssteps, final_only in sampler_list:
                            if final_only and step != _steps:
                                continue
                            x = trainer.sample(prof["eval_samples"], sampler=sname, steps=ssteps, seed=eval_seed)
                            sc = evaluator(x.float().cpu(), sample_steps=ssteps, sampler=sname)
                            _evals.append({"step": step, "sampler": _sampler_key((sname, ssteps, final_only)),
                                           **{m: sc[m] for m in evaluator.metric_names}})
                            res.update({f"q_{sname}{ssteps}_{m}": sc[m] for m in evaluator.metric_names})
                            if step == _steps:
                                save_grid(getattr(evaluator, "decode", lambda v: v)(x[:100].cpu()),
                                          _dir / f"samples_{sname}{ssteps}.png", nrow=10)
                        say(f"  {rname} {_label:>20s} seed {_seed} step {step:>6d}: " + "  ".join(
                            f"{k[2:]} {v:.4g}" for k, v in res.items() if k.endswith("_" + metric)))
                        return res

                    trainer = Trainer(cfg)
                    try:
                        trainer.run(eval_fn=eval_fn, eval_every=prof["eval_every"])
                    finally:
                        trainer.close()
                    if trainer.ckpt_path.exists():
                        trainer.ckpt_path.unlink()
                    record.write_text(json.dumps({"signature": signature, "evals": evals}, indent=1))
                for e in evals:
                    for m in evaluator.metric_names:
                        rows.append({"regime": rname, "strategy": label, "sampler": e["sampler"], "seed": seed,
                                     "step": e["step"], "metric": m, "value": e[m]})
                    curves.setdefault((label, e["sampler"]), {}).setdefault(seed, []).append((e["step"], e[metric]))
        # the speed-up is paired over seeds: each strategy is summarised on the seeds that it and
        # uniform have both finished (a strategy added later reports on its own seeds)
        u_seeds = _finished_seeds(curves, "uniform", seed_list, sampler_list)
        seeds_of = {label: [sd for sd in _finished_seeds(curves, label, seed_list, sampler_list) if sd in u_seeds]
                    for label, _, _ in specs}
        if not u_seeds:
            say(f"regimes: {rname}: no uniform run is recorded yet; no summary")
            summary["regimes"][rname] = {"data": data, "profile": prof, "seeds": seeds_of, "samplers": {}}
            continue
        summary["regimes"][rname] = _summarise_regime(rname, data, prof, reg, specs, seeds_of, sampler_list, curves,
                                                      metric, evaluator, floor, prediction, n_boot, out)
        summary["regimes"][rname]["seeds"] = seeds_of

    meta = {**_provenance(command, device), "profile": profile, "seeds": seed_list,
            "samplers": [f"{a}-{b}" + ("@final" if f else "") for a, b, f in sampler_list], "strategies": [s[0] for s in specs],
            "wall_time_s": round(time.perf_counter() - t0, 1)}
    summary["meta"] = meta
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "summary.md").write_text(_markdown(summary))
    say(_markdown(summary))
    say(f"wrote {out / 'results.csv'}, {out / 'summary.md'}, {out / 'summary.json'} and plots ({meta['wall_time_s']} s)")
    return summary


def _finished_seeds(curves, label, seeds, samplers) -> list:
    """The seeds with a record of ``label`` for every sampler."""
    return [sd for sd in seeds if all(sd in curves.get((label, _sampler_key(sp)), {}) for sp in samplers)]


def _recorded_floor(runs: Path, seeds) -> dict | None:
    """The floor in the signature of the first recorded uniform run of a regime (None if none)."""
    for sd in seeds:
        rec = runs / f"uniform-seed{sd}" / "evals.json"
        if rec.exists():
            return json.loads(rec.read_text())["signature"]["floor"]
    return None


def _summarise_regime(rname, data, prof, reg, specs, seeds_of, samplers, curves, metric, evaluator, floor, prediction,
                      n_boot, out):
    desc = evaluator.describe()
    res = {"data": data, "profile": prof, "learn_sigma": reg["learn_sigma"], "metric": metric,
           "floor": {m: floor[m] for m in evaluator.metric_names}, "floor_n": floor["n"],
           "reconstruction": desc.get("reconstruction"), "analysis": prediction, "samplers": {}}
    if data.startswith("latents:"):
        # the signature names the latents folder, not its contents: a re-encode (another machine) makes
        # other latents, so the summary says which encode the reconstruction floor belongs to
        info = Path(data[len("latents:"):]) / "info.json"
        res["latents_encoded"] = json.loads(info.read_text()).get("date") if info.exists() else None
    for sname, ssteps, final_only in samplers:
        sk = _sampler_key((sname, ssteps, final_only))
        per = {}  # label -> (steps, [seeds, evaluations] array, seeds)
        for label, _, _ in specs:
            seeds = seeds_of[label]
            if seeds:
                by_seed = curves[(label, sk)]
                per[label] = ([s for s, _ in by_seed[seeds[0]]],
                              np.array([[v for _, v in by_seed[sd]] for sd in seeds]), seeds)
        u_steps, u_all, u_seeds = per["uniform"]
        table = []
        for label, _, _ in specs:
            if label not in per:
                table.append({"strategy": label, "seeds": [], "final": None, "final_sd": None,
                              "steps_to_uniform_final": None, "uniform_steps": None, "speedup": None, "bound": None,
                              "ci95": [None, None], "reached_share": None})
                continue
            steps, vals, seeds = per[label]
            u_vals = u_all[[u_seeds.index(sd) for sd in seeds]]  # uniform on the same seeds: paired
            if final_only:  # one point per seed: a final score, no curve to read a speed-up on
                sp = {"steps": None, "uniform_steps": None, "speedup": None, "bound": None}
                lo = hi = reached = None
            else:
                sp = speedup((u_steps, u_vals.mean(0)), (steps, vals.mean(0)))
                lo, hi, reached = (bootstrap_speedup(steps, u_vals, vals, n_boot=n_boot) if len(seeds) > 1
                                   else (None, None, None))
            finals = vals[:, -1]
            table.append({"strategy": label, "seeds": seeds, "final": float(finals.mean()),
                          "final_sd": float(finals.std(ddof=1)) if len(seeds) > 1 else None,
                          "steps_to_uniform_final": sp["steps"], "uniform_steps": sp["uniform_steps"],
                          "speedup": sp["speedup"], "bound": sp["bound"], "ci95": [lo, hi], "reached_share": reached})
        res["samplers"][sk] = table
        if not final_only:
            _plot(out / f"{rname}_{sname}{ssteps}.png", rname, sk, per, metric, res["floor"][metric])
            res.setdefault("speedup_curves", {})[sk] = curve = speedup_curve(per, n_boot=n_boot)
            if curve["targets"]:
                _plot_speedup_curve(out / f"{rname}_{sname}{ssteps}_speedup.png", rname, sk, curve)
    return res


def curve_targets(steps) -> list:
    """The uniform steps s whose score is a target: every 1,000th step, and the final one."""
    return [int(s) for i, s in enumerate(steps) if (s % 1000 == 0 or i == len(steps) - 1) and s > 0]


def speedup_curve(per: dict, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """The speed-up as a function of the target (issue 20): for each step s of uniform's curve in
    ``curve_targets``, the quality uniform's mean curve has at s is the target; the speed-up is
    uniform's first step reaching it over the strategy's (``speedup`` on uniform's curve cut at s),
    with a paired bootstrap over seeds as for the final target. ``per``: label -> (steps,
    [seeds, evals] values, seeds), uniform among them."""
    u_steps, u_all, u_seeds = per["uniform"]
    targets = curve_targets(u_steps)
    out = {"targets": targets, "strategies": {}}
    for label, (steps, vals, seeds) in per.items():
        if label == "uniform" or list(steps) != list(u_steps):
            continue
        u_vals = u_all[[u_seeds.index(sd) for sd in seeds]]
        rows = []
        for s in targets:
            i = list(u_steps).index(s) + 1
            sp = speedup((u_steps[:i], u_vals.mean(0)[:i]), (steps, vals.mean(0)))
            if len(seeds) > 1:
                rng = np.random.default_rng(seed)
                boot = np.empty(n_boot)
                for b in range(n_boot):
                    idx = rng.integers(0, len(seeds), len(seeds))
                    r = speedup((u_steps[:i], u_vals[idx].mean(0)[:i]), (steps, vals[idx].mean(0)))
                    boot[b] = 0.0 if r["speedup"] is None else r["speedup"]
                ci = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
            else:
                ci = [None, None]
            rows.append({"s": s, "target": sp["target"], "uniform_steps": sp["uniform_steps"], "steps": sp["steps"],
                         "speedup": sp["speedup"], "bound": sp["bound"], "ci95": ci})
        out["strategies"][label] = {"seeds": seeds, "rows": rows}
    return out


def _plot_speedup_curve(path, rname, sk, curve):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for label, entry in curve["strategies"].items():
        rows = entry["rows"]
        s = [r["s"] for r in rows]
        v = [np.nan if r["speedup"] is None else r["speedup"] for r in rows]
        line, = ax.plot(s, v, marker="o", ms=3, lw=1.4, label=f"{label} ({len(entry['seeds'])} seeds)")
        lo = [np.nan if r["ci95"][0] is None else r["ci95"][0] for r in rows]
        hi = [np.nan if r["ci95"][1] is None else r["ci95"][1] for r in rows]
        ax.fill_between(s, lo, hi, color=line.get_color(), alpha=0.12, lw=0)
        # a bound, not a reading (a target met before the first evaluation): an open triangle that
        # points the way the true value lies (up: at least, down: at most)
        for mark, sign in (("^", ">="), ("v", "<=")):
            pts = [(x, y) for x, y, r in zip(s, v, rows) if r["bound"] == sign]
            if pts:
                ax.plot(*zip(*pts), ls="none", marker=mark, ms=9, mfc="none", mec=line.get_color())
    for mark, sign, text in (("^", ">=", "at least"), ("v", "<=", "at most")):
        if any(r["bound"] == sign for e in curve["strategies"].values() for r in e["rows"]):
            ax.plot([], [], ls="none", marker=mark, ms=9, mfc="none", mec="gray",
                    label=f"{text} (target met at the first evaluation)")
    ax.axhline(1.0, color="k", ls="--", lw=1, label="uniform")
    ax.set_xlabel("target: uniform's score at step s")
    ax.set_ylabel("speed-up (uniform's steps / the strategy's)")
    _finish(fig, ax, path, f"{rname}, {sk}: speed-up against the target (band: bootstrap 95% over seeds)")


def _plot(path, rname, sk, per, metric, floor):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for label, (steps, vals, seeds) in per.items():
        line, = ax.plot(steps, vals.mean(0), marker="o", ms=3, lw=1.4, label=f"{label} ({len(seeds)} seeds)")
        if len(seeds) > 1:
            ax.fill_between(steps, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.12, lw=0)
    ax.axhline(floor, color="k", ls="--", lw=1, label="real vs real")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.set_yscale("log")
    _finish(fig, ax, path, f"{rname}, {sk}: mean over seeds (band min-max)")


def _finish(fig, ax, path, title):
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _f(v, d=3):
    return "n/a" if v is None else f"{v:.{d}g}"


def _markdown(summary: dict) -> str:
    meta = summary.get("meta", {})
    lines = ["# Regime study (issue 13)", ""]
    if meta:
        lines += [f"- produced by: `{meta['command']}`", f"- date: {meta['date']}; machine: {meta['machine']}; "
                  f"device: {meta['device']}", f"- versions: {json.dumps(meta['versions'])}; git {meta['git_commit']}",
                  f"- profile {meta['profile']}, seeds {meta['seeds']}, wall time {meta['wall_time_s']} s", ""]
    for rname, r in summary["regimes"].items():
        if not r.get("samplers"):
            lines += [f"## {rname}", "", "no uniform run is recorded yet", ""]
            continue
        a = r["analysis"]
        lines += [f"## {rname} ({r['data']}, {r['profile']['model']}, {r['profile']['steps']} steps, batch "
                  f"{r['profile']['batch_size']}{', learned sigma' if r['learn_sigma'] else ''})", "",
                  f"metric {r['metric']} on {r['profile']['eval_samples']} samples; real-vs-real floor "
                  + ", ".join(f"{k} {_f(v, 4)}" for k, v in r["floor"].items())
                  + (f"; reconstruction floor {r['metric']} {_f(r['reconstruction'].get(r['metric']), 4)} "
                     f"(n = {r['reconstruction'].get('n')}"
                     + (f"; latents encoded {r['latents_encoded']}" if r.get("latents_encoded") else "") + ")"
                     if r.get("reconstruction") else ""),
                  f"analysis of the training data: schedule tau {a['tau_schedule']}, data tau {a['tau_data']}, "
                  f"recommended k {a['k']:.2g}", "each strategy against uniform on the seeds both have finished "
                  "(seeds column); speed-up = uniform's steps / the strategy's steps to uniform's final score", ""]
        for sk, table in r["samplers"].items():
            u = next(row for row in table if row["strategy"] == "uniform")
            floor = r["floor"][r["metric"]]
            lines += [f"### {sk}", ""]
            if u["final"] is not None and floor and floor > 0:
                # how much room is left above the metric's floor: near 1x, speed-ups read seed noise
                lines += [f"uniform's final {r['metric']} is {u['final'] / floor:.3g}x the real-vs-real floor "
                          f"({_f(u['final'], 4)} vs {_f(floor, 4)})", ""]
            lines += ["| strategy | seeds | final (mean ± sd) | steps to uniform's final | speed-up | "
                      "95% CI (bootstrap over seeds) | reached |", "|---|---|---|---|---|---|---|"]
            for row in table:
                if not row["seeds"]:
                    lines.append(f"| {row['strategy']} | none | no record yet | | | | |")
                    continue
                seeds = ",".join(str(sd) for sd in row["seeds"])
                sp = "final only" if sk.endswith("@final") else "not reached" if row["steps_to_uniform_final"] is None else (
                    (row["bound"] + " " if row["bound"] else "") + f"{row['speedup']:.2f}x")
                ci = "n/a" if row["ci95"][0] is None else f"[{row['ci95'][0]:.2f}, {row['ci95'][1]:.2f}]"
                lines.append(f"| {row['strategy']} | {seeds} | {_f(row['final'], 4)} ± {_f(row['final_sd'], 2)} | "
                             f"{_f(row['steps_to_uniform_final'], 4)} | {sp} | {ci} | {_f(row['reached_share'], 2)} |")
            lines.append("")
            curve = r.get("speedup_curves", {}).get(sk)
            if curve and len(curve["targets"]) > 1 and curve["strategies"]:
                lines += [f"speed-up against the target ({sk}): the target is uniform's mean score at step s; "
                          "each cell is the speed-up [bootstrap 95 % CI]", "",
                          "| strategy | seeds | " + " | ".join(f"s = {s}" for s in curve["targets"]) + " |",
                          "|---|---|" + "---|" * len(curve["targets"])]
                for label, entry in curve["strategies"].items():
                    cells = []
                    for row in entry["rows"]:
                        if row["speedup"] is None:
                            cells.append("not reached")
                            continue
                        ci = "" if row["ci95"][0] is None else f" [{row['ci95'][0]:.2f}, {row['ci95'][1]:.2f}]"
                        cells.append((row["bound"] + " " if row["bound"] else "") + f"{row['speedup']:.2f}x{ci}")
                    lines.append(f"| {label} | {','.join(str(sd) for sd in entry['seeds'])} | " + " | ".join(cells) + " |")
                lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/regimes.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--regimes", default="digits-pixel,fmnist-pixel,fmnist-latent", help=f"of {', '.join(REGIMES)}")
    p.add_argument("--strategies", default=STUDY_STRATEGIES, help="compare's strategy syntax; must include uniform")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--samplers", help="comma-separated ddpm-N / ddim-N, @final to score the last step only "
                   f"(default per profile: {SAMPLERS})")
    p.add_argument("--profile", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--steps", type=int, help="override the profile's training steps")
    p.add_argument("--eval-every", type=int, help="override the profile's evaluation interval")
    p.add_argument("--eval-samples", type=int, help="override the profile's samples per evaluation")
    p.add_argument("--out", help="default benchmarks/results/regimes (runs/regimes-smoke with --smoke)")
    p.add_argument("--latents", help="encode folders live here (default <out>/latents); made on first use")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared machine)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the speed-up interval")
    p.add_argument("--smoke", action="store_true", help="a tiny slice of digits regimes to check the pipeline")
    p.add_argument("--train-only", help="comma-separated labels of --strategies that this process may train; the "
                   "others are only read back from their records (two processes sharing one study)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: summarise the runs already recorded under --out (each strategy on the seeds "
                        "it and uniform have finished)")
    args = p.parse_args(argv)
    kw = dict(regimes=args.regimes, strategies=args.strategies, seeds=args.seeds, samplers=args.samplers)
    if args.smoke:
        kw.update(SMOKE)
    out = args.out or str(ROOT / ("runs/regimes-smoke" if args.smoke else "benchmarks/results/regimes"))
    command = "python benchmarks/regimes.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    run_study(**kw, profile=args.profile, out=out, latents=args.latents, device=args.device, threads=args.threads,
              steps=args.steps, eval_every=args.eval_every, eval_samples=args.eval_samples, n_boot=args.bootstrap,
              command=command.strip(), verbose=not args.quiet, report_only=args.report_only,
              train_only=args.train_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
