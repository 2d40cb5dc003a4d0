"""CPU benchmark of the loss path: our backends (the fused `cpp`, the `torch-fast` fallback) against
plain eager PyTorch.

One training step's loss path without the model: draw t, draw eps, q_sample, the weighted
per-sample MSE, the batch mean, backward to `pred`. Side by side in one run, interleaved repeat by
repeat (so background load hits both sides alike), median and p20/p80 over the repeats:

* eager: written the way DiT / diffusers write it (torch.randint or torch.multinomial for t, with
  SpeeD's mirrored half batch as the official code does it; randn_like; gathers of the schedule;
  mean_flat; weights[t]; mean; backward);
* cpp:   DiffusionLoss(..., backend="cpp"): the noise op (t, eps and x_t in one pass) and the loss op
  (eps regenerated from the counter, loss and gradient in one pass), backward = one scale;
* torch-fast: DiffusionLoss(..., backend="torch-fast"), the fallback where no kernel backend
  loads (plain PyTorch ops, torch's generator); `--impls eager,cpp,torch-fast,torch` adds the
  bit-exact reference too.

    python benchmarks/bench_cpu.py                      # both shapes, uniform and SpeeD
    python benchmarks/bench_cpu.py --repeats 10 --shapes 64x3x64x64
    python benchmarks/bench_cpu.py --threads 1 --shapes 4x4x8x8,64x3x64x64 --host-shapes ""

Writes benchmarks/results/cpu_<host>.md and .csv (cpu_<host>_t<N> with --threads N) with the
machine, versions, date, command and the load average (the numbers move with background load).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from speed_kernels import DiffusionLoss, NoiseSchedule, strategies  # noqa: E402
from speed_kernels.backends import numerics_env  # noqa: E402


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or "unknown"


def eager_step_factory(sched: NoiseSchedule, strategy_name: str, x0: torch.Tensor, pred: torch.Tensor):
    """The loss path as DiT's train.py + gaussian_diffusion.py (and SpeeD's official sampler) write it."""
    T = sched.num_timesteps if hasattr(sched, "num_timesteps") else len(sched.betas)
    strat = strategies.get(strategy_name)
    probs = torch.as_tensor(strat.probs(sched, step=0), dtype=torch.float64)
    weights = torch.as_tensor(strat.weights(sched, prediction="eps"), dtype=torch.float64)
    sqrt_ab = torch.as_tensor(sched.alphas_cumprod, dtype=torch.float64).sqrt()
    sqrt_1mab = (1.0 - torch.as_tensor(sched.alphas_cumprod, dtype=torch.float64)).sqrt()
    mirror = bool(getattr(strat, "mirror", False))
    pivot = int(strat.pivot(sched)) if mirror else 0
    B = x0.shape[0]
    uniform = strategy_name == "uniform"

    def extract(arr, t, shape):  # DiT's _extract_into_tensor
        res = arr[t].float()
        while len(res.shape) < len(shape):
            res = res[..., None]
        return res + torch.zeros(shape, device=t.device)

    def step():
        if uniform:
            t = torch.randint(0, T, (B,))
        elif mirror:  # SpeeD official: B//2+1 draws, the rest mirrored around the pivot
            t = torch.multinomial(probs, B // 2 + 1, replacement=True)
            dual = torch.where(t < pivot, pivot - t, t - pivot)
            t = torch.cat([t, dual])[:B]
        else:
            t = torch.multinomial(probs, B, replacement=True)
        noise = torch.randn_like(x0)
        x_t = extract(sqrt_ab, t, x0.shape) * x0 + extract(sqrt_1mab, t, x0.shape) * noise
        mse = ((noise - pred) ** 2).mean(dim=list(range(1, x0.dim())))  # mean_flat
        loss = (mse * weights[t].float()).mean()
        pred.grad = None  # optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return x_t, loss

    return step


def fused_step_factory(sched: NoiseSchedule, strategy_name: str, x0: torch.Tensor, pred: torch.Tensor,
                       backend: str = "cpp"):
    fn = DiffusionLoss(sched, strategy_name, prediction="eps", backend=backend, seed=0)

    def step():
        x_t, t = fn.noise(x0)
        loss = fn.loss(pred, x0, t)
        pred.grad = None
        loss.backward()
        return x_t, loss

    return step, fn


def _steps(sched, strategy_name, x0, pred, impls):
    """{impl: step function}: "eager" is plain PyTorch, anything else a DiffusionLoss backend."""
    steps = {}
    for name in impls:
        if name == "eager":
            steps[name] = eager_step_factory(sched, strategy_name, x0, pred)
        else:
            steps[name], fn = fused_step_factory(sched, strategy_name, x0, pred, backend=name)
            chosen = fn.backend(x0.device).name
            assert chosen == name, f"DiffusionLoss picked {chosen!r} for {name!r}: the extension is not built?"
    return steps


def _interleaved(steps, repeats, block=1):
    """Seconds per step of each impl, the impls rotated repeat by repeat so load hits all alike."""
    names = list(steps)
    times = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            f = steps[name]
            t0 = time.perf_counter()
            for _ in range(block):
                f()
            times[name].append((time.perf_counter() - t0) / block)
    return times


def bench(shape, strategy_name, repeats, warmup, impls, dtype=torch.float32):
    sched = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g).to(dtype)
    pred = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    steps = _steps(sched, strategy_name, x0, pred, impls)
    for _ in range(warmup):
        for f in steps.values():
            f()
    rows = []
    for name, ts in _interleaved(steps, repeats).items():
        q = statistics.quantiles(ts, n=5)
        rows.append(
            {
                "shape": "x".join(map(str, shape)),
                "dtype": str(dtype).replace("torch.", ""),
                "strategy": strategy_name,
                "impl": name,
                "median_ms": statistics.median(ts) * 1e3,
                "p20_ms": q[0] * 1e3,
                "p80_ms": q[3] * 1e3,
                "repeats": repeats,
            }
        )
    for r in rows:
        r["speedup_vs_eager"] = rows[0]["median_ms"] / r["median_ms"]
    return rows


def host_rows(shapes, strategy_name, repeats, impls, block=50):
    """Host time per step at tiny shapes on one thread: where the step is all interpreter and
    dispatcher overhead. Each repeat times `block` consecutive steps (timer resolution), the impls
    alternating repeat by repeat; microseconds per step."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for shape in shapes:
            sched = NoiseSchedule.linear()
            g = torch.Generator().manual_seed(0)
            x0 = torch.randn(shape, generator=g)
            pred = torch.randn(shape, generator=g).requires_grad_()
            steps = _steps(sched, strategy_name, x0, pred, impls)
            for _ in range(block):
                for f in steps.values():
                    f()
            out = {}
            for name, ts in _interleaved(steps, repeats, block).items():
                q = statistics.quantiles(ts, n=5)
                out[name] = (statistics.median(ts) * 1e6, q[0] * 1e6, q[3] * 1e6)
            rows.append(("x".join(map(str, shape)), strategy_name, out))
    finally:
        torch.set_num_threads(prev)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="64x3x64x64,256x4x32x32")
    ap.add_argument("--strategies", default="uniform,speed")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--host-shapes", default="4x4x8x8,64x4x8x8",
                    help="shapes of the host-time-per-step rows (one thread); empty: skip them")
    ap.add_argument("--host-repeats", type=int, default=40, help="repeats (of 50 steps each) per host row")
    ap.add_argument("--impls", default="eager,cpp,torch-fast",
                    help="eager (plain PyTorch) first, then DiffusionLoss backends: cpp, torch-fast, torch")
    args = ap.parse_args(argv)

    impls = [i for i in args.impls.split(",") if i]
    if not impls or impls[0] != "eager":
        raise SystemExit("--impls must start with eager (the baseline every ratio is taken against)")
    if args.threads:
        torch.set_num_threads(args.threads)
    host = socket.gethostname().split(".")[0] or "host"
    load_before = os.getloadavg()
    all_rows = []
    for shape_s in args.shapes.split(","):
        shape = tuple(int(s) for s in shape_s.split("x"))
        for strat in args.strategies.split(","):
            rows = bench(shape, strat, args.repeats, args.warmup, impls)
            all_rows += rows
            print(f"{shape_s:>14} {strat:>8}: " + "  ".join(
                f"{r['impl']} {r['median_ms']:8.2f} ms ({r['speedup_vs_eager']:4.2f}x)" for r in rows), flush=True)
    hrows = []
    if args.host_shapes:
        hshapes = [tuple(int(v) for v in s.split("x")) for s in args.host_shapes.split(",")]
        for strat in args.strategies.split(","):
            hrows += host_rows(hshapes, strat, args.host_repeats, impls)
        for shape_s, strat, out in hrows:
            e = out["eager"][0]
            print(f"host/step {shape_s:>10} {strat:>8}: " + "  ".join(
                f"{n} {v[0]:7.1f} us ({v[0] / e:4.2f})" for n, v in out.items()), flush=True)
    load_after = os.getloadavg()

    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"cpu_{host}" + (f"_t{args.threads}" if args.threads else ""))
    fields = ["shape", "dtype", "strategy", "impl", "median_ms", "p20_ms", "p80_ms", "speedup_vs_eager", "repeats"]
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in all_rows:
            w.writerow({k: (f"{r[k]:.4f}" if isinstance(r[k], float) else r[k]) for k in fields})
    from speed_kernels import _ext

    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    lines = [
        "# CPU loss path: our backends vs eager PyTorch",
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
        f" ({'AVX2+FMA kernels' if _ext.available()['cpu_avx2'] else 'generic kernels'})",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- SPEED_* environment: {numerics_env() or 'none'}",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{cmd}`",
        f"- load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f}"
        " (a shared machine: other jobs ran alongside; repeats are interleaved so both sides see the same load)",
        "- step = t, eps, x_t, weighted MSE, mean, backward to pred (no model); median of "
        f"{args.repeats} interleaved repeats after {args.warmup} warm-up steps",
        "",
        "| shape | dtype | strategy | " + " | ".join(f"{i} ms (p20-p80)" for i in impls)
        + " | " + " | ".join(f"{i} speed-up" for i in impls[1:]) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in range(2 * len(impls) - 1)) + " |",
    ]
    for i in range(0, len(all_rows), len(impls)):
        group = all_rows[i: i + len(impls)]
        e = group[0]
        lines.append(
            f"| {e['shape']} | {e['dtype']} | {e['strategy']} | "
            + " | ".join(f"{r['median_ms']:.2f} ({r['p20_ms']:.2f}-{r['p80_ms']:.2f})" for r in group)
            + " | " + " | ".join(f"{r['speedup_vs_eager']:.2f}x" for r in group[1:]) + " |"
        )
    if hrows:
        lines += [
            "",
            "## Host time per step (one thread, tiny tensors: interpreter + dispatcher overhead)",
            "",
            f"t, eps, x_t, loss, backward; us per step, median (p20-p80) of {args.host_repeats} interleaved"
            " repeats of 50 steps each.",
            "",
            "| shape | strategy | " + " | ".join(f"{i} us/step" for i in impls) + " | "
            + " | ".join(f"{i} / eager" for i in impls[1:]) + " |",
            "| --- | --- | " + " | ".join("---" for _ in range(2 * len(impls) - 1)) + " |",
        ]
        for shape_s, strat, out in hrows:
            e = out["eager"][0]
            lines.append(f"| {shape_s} | {strat} | "
                         + " | ".join(f"{v[0]:.1f} ({v[1]:.1f}-{v[2]:.1f})" for v in out.values()) + " | "
                         + " | ".join(f"{out[n][0] / e:.2f}" for n in impls[1:]) + " |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {base}.md and {base}.csv")


if __name__ == "__main__":
    main()
