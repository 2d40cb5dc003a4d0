"""Quality against training iterations for each time-step strategy (the benchmark form of
`speed-kernels compare`): same options, results under benchmarks/results/quality_vs_steps/<data>/.

    python benchmarks/quality_vs_steps.py                               # 6 strategies on digits, CPU
    python benchmarks/quality_vs_steps.py --seeds 0,1,2 --steps 2000 --eval-every 250
    python benchmarks/quality_vs_steps.py --objective flow --threads 1 --seeds 0,1,2   # -> digits_flow/
    python benchmarks/quality_vs_steps.py --data fashion-mnist --model unet-small --steps 3000 \\
        --eval-every 500 --batch-size 128 --device cuda

Writes results.md / results.csv / results.json (each with the command, versions, machine and
date) and quality_vs_steps.png, and prints the table. ``--objective flow`` compares flow-matching
strategies (default uniform, logit_normal, mode, speed; Euler sampler) and writes to <data>_flow/. See speed_train/compare.py for what is held
fixed, how the speed-up is read off and what the default sizes cost.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "python"):  # runnable from a checkout without `pip install -e .`
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from speed_train.compare import add_compare_command, run_compare  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="quality_vs_steps.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    p = add_compare_command(sub)
    p.prog = "python benchmarks/quality_vs_steps.py"
    args = p.parse_args(argv)
    out = args.out
    if out == p.get_default("out"):
        folder = Path(args.data).name.replace(".", "_") + ("_flow" if args.objective == "flow" else "")
        out = str(ROOT / "benchmarks" / "results" / "quality_vs_steps" / folder)
    command = "python benchmarks/quality_vs_steps.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    run_compare(
        args.strategies, params=args.param, objective=args.objective, data=args.data, model=args.model, steps=args.steps, eval_every=args.eval_every,
        seeds=args.seeds, out=out, eval_samples=args.eval_samples, sample_steps=args.sample_steps,
        sampler=args.sampler, metric=args.metric, batch_size=args.batch_size, lr=args.lr, schedule=args.schedule,
        prediction=args.prediction, learn_sigma=args.learn_sigma, backend=args.backend, device=args.device,
        threads=args.threads, reuse=args.reuse, keep_checkpoints=args.keep_checkpoints,
        command=command.strip(), verbose=not args.quiet,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
