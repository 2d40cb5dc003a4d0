"""Why does `adaptive` lose? Its sampling table against t over training, beside the loss per bucket.

    python benchmarks/adaptive_diagnosis.py                     # fmnist-latent's profile, seed 99, ~8 min one core
    python benchmarks/adaptive_diagnosis.py --strategy adaptive:relative=false --steps 600

Trains the regime study's fmnist-latent profile (benchmarks/regimes.py: DiT-mini, learned sigma,
1,500 steps, batch 64, lr 1e-3) with the given adaptive strategy on a seed the study does not report
(99, the tuning seed) and snapshots the strategy every ``--every`` steps: the bucket table p_b, the
fast and slow loss averages per bucket and the learning progress LP_b. Writes ``diagnosis.json``
(the snapshots, with the command and versions) under ``--out`` and a figure (``--plot``, default
docs/adaptive_diagnosis.png): the table against t and step (as a multiple of uniform), SpeeD's
table beside it, the per-bucket loss over training, and how much of the table survives from one
snapshot to the next (the correlation of LP between snapshots ``--lag`` steps apart) -- a table
driven by the signal keeps its shape, one driven by noise does not.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "python", ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from regimes import REGIMES, _ensure_latents  # noqa: E402  (one source of truth for the profile)


def snapshot(strategy, step: int) -> dict:
    """The adaptive strategy's state at a step (bucket level), as plain lists."""
    return {"step": step, "table": strategy._pb.tolist(), "fast": strategy._fast.tolist(),
            "slow": strategy._slow.tolist(), "progress": strategy.progress().tolist()}


def lag_correlation(snaps: list[dict], lag_steps: int, key: str = "progress") -> list[tuple[int, float]]:
    """Pearson correlation of ``key`` over buckets between each snapshot and the one ``lag_steps``
    earlier (nan where either is constant)."""
    by_step = {s["step"]: np.asarray(s[key]) for s in snaps}
    out = []
    for s in snaps:
        prev = by_step.get(s["step"] - lag_steps)
        if prev is None:
            continue
        a, b = np.asarray(s[key]), prev
        r = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
        out.append((s["step"], r))
    return out


def plot(path: Path, result: dict, speed_mass: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    snaps = result["snapshots"]
    edges = np.asarray(result["edges"])
    B = len(edges) - 1
    steps = np.array([s["step"] for s in snaps])
    table = np.array([s["table"] for s in snaps]) * B  # 1 = uniform
    fast = np.array([s["fast"] for s in snaps])
    fig, ax = plt.subplots(1, 4, figsize=(19, 4.2))
    im = ax[0].imshow(table.T, aspect="auto", origin="lower", cmap="RdBu_r", vmin=0, vmax=2,
                      extent=[steps[0], steps[-1], 0, edges[-1]])
    ax[0].set(xlabel="training step", ylabel="t", title=f"{result['strategy']}: p_b / uniform")
    fig.colorbar(im, ax=ax[0])
    mid = (edges[:-1] + edges[1:]) / 2
    for frac in (0.25, 0.5, 1.0):
        i = min(len(snaps) - 1, int(round(frac * (len(snaps) - 1))))
        ax[1].step(mid, table[i], where="mid", label=f"adaptive, step {steps[i]}")
    ax[1].step(mid, speed_mass * B, where="mid", color="k", lw=2, label="SpeeD (k=5, tau=700)")
    ax[1].axhline(1, color="gray", lw=0.8)
    ax[1].set(xlabel="t", ylabel="bucket mass / uniform", title="where each strategy draws")
    ax[1].legend(fontsize=8)
    cmap = plt.get_cmap("viridis")
    for b in range(0, B, max(1, B // 10)):
        ax[2].plot(steps, fast[:, b], color=cmap(b / B), label=f"t {edges[b]}-{edges[b + 1] - 1}")
    ax[2].set(xlabel="training step", ylabel="loss (fast average)", yscale="log", title="loss per bucket")
    ax[2].legend(fontsize=7, ncol=2)
    corr = result["lag_correlation"]
    if corr:
        ax[3].plot([c[0] for c in corr], [c[1] for c in corr], "o-")
    ax[3].axhline(0, color="gray", lw=0.8)
    ax[3].set(xlabel="training step", ylabel="corr(LP now, LP earlier)", ylim=(-1, 1),
              title=f"does the table keep its shape? (lag {result['lag']} steps)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategy", default="adaptive", help="an adaptive spec, e.g. adaptive:relative=false")
    ap.add_argument("--regime", default="fmnist-latent", help=f"a regime of benchmarks/regimes.py ({', '.join(REGIMES)})")
    ap.add_argument("--steps", type=int, default=None, help="default: the regime's CPU profile")
    ap.add_argument("--seed", type=int, default=99, help="default 99: the tuning seed, never reported")
    ap.add_argument("--every", type=int, default=25, help="snapshot every N steps")
    ap.add_argument("--lag", type=int, default=100, help="steps between the snapshots whose LP are correlated")
    ap.add_argument("--latents", default=str(ROOT / "benchmarks/results/regimes/latents"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/adaptive_diagnosis"))
    ap.add_argument("--plot", default=str(ROOT / "docs/adaptive_diagnosis.png"))
    args = ap.parse_args(argv)

    from speed_kernels.analysis import strategy_summary
    from speed_train.compare import parse_strategies
    from speed_train.records import provenance
    from speed_train.trainer import Trainer, TrainConfig, make_schedule

    if args.every < 1 or args.lag < args.every or args.lag % args.every:
        ap.error("--every must be >= 1 and --lag a multiple of it")
    [(label, name, params)] = parse_strategies(args.strategy)
    if name != "adaptive":
        ap.error(f"--strategy must be an adaptive spec, got {args.strategy!r}")
    reg = REGIMES[args.regime]
    prof = dict(reg["cpu"])
    steps = args.steps or prof["steps"]
    data = reg["data"]
    if data.startswith("latents:"):
        folder = Path(args.latents) / f"{reg['encode_from']}{'-smoke' if 'encode' in reg else ''}"
        _ensure_latents(reg, folder, print)
        data = f"latents:{folder}"
    out = Path(args.out)
    cfg = TrainConfig(model=prof["model"], data=data, strategy=name, strategy_params=dict(params), steps=steps,
                      batch_size=prof["batch_size"], lr=prof.get("lr"), learn_sigma=reg["learn_sigma"],
                      seed=args.seed, device=args.device, out=str(out / "run"), name=f"{label}-seed{args.seed}",
                      log_every=50, sample_every=0, ckpt_every=0, sample_n=0, progress=True, threads=args.threads)
    snaps: list[dict] = []

    def record(trainer, step):
        st = trainer.loss_fn.strategy
        if getattr(st, "_state_T", None) is not None:
            snaps.append(snapshot(st, step))
        return {}

    trainer = Trainer(cfg)
    try:
        trainer.run(eval_fn=record, eval_every=args.every)
        strategy = trainer.loss_fn.strategy
        edges = strategy.bucket_edges()
    finally:
        trainer.close()
    schedule = make_schedule("linear", int(edges[-1]))
    # SpeeD as it draws: the official code's mirrored half batch included, at the profile's batch size
    speed_p = strategy_summary("speed", schedule, batch_size=prof["batch_size"])["probs_effective"]
    speed_mass = np.add.reduceat(np.asarray(speed_p, dtype=np.float64), edges[:-1])
    result = {"strategy": label, "regime": args.regime, "steps": steps, "seed": args.seed, "every": args.every,
              "lag": args.lag, "edges": edges.tolist(), "speed_bucket_mass": speed_mass.tolist(),
              "snapshots": snaps, "lag_correlation": lag_correlation(snaps, args.lag),
              "provenance": provenance(None, args.device, produced_by="benchmarks/adaptive_diagnosis.py")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnosis.json").write_text(json.dumps(result, indent=1))
    plot(Path(args.plot), result, speed_mass)
    corr = [c[1] for c in result["lag_correlation"] if np.isfinite(c[1])]
    last = np.asarray(snaps[-1]["table"]) * len(speed_mass)
    print(f"adaptive_diagnosis: {label}, {steps} steps: table/uniform at the end "
          f"min {last.min():.2f} max {last.max():.2f}; mass at t >= 700: "
          f"{np.asarray(snaps[-1]['table'])[edges[:-1] >= 700].sum():.2f} (SpeeD {speed_mass[edges[:-1] >= 700].sum():.2f}); "
          f"median corr(LP, LP {args.lag} steps earlier) {np.median(corr) if corr else float('nan'):.2f}")
    print(f"adaptive_diagnosis: wrote {out / 'diagnosis.json'} and {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
