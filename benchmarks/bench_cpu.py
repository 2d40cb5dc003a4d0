"""CPU benchmark of the loss path: the fused `cpp` backend against plain eager PyTorch.

One training step's loss path without the model: draw t, draw eps, q_sample, the weighted
per-sample MSE, the batch mean, backward to `pred`. Side by side in one run, interleaved repeat by
repeat (so background load hits both sides alike), median and p20/p80 over the repeats:

* eager: written the way DiT / diffusers write it (torch.randint or torch.multinomial for t, with
  SpeeD's mirrored half batch as the official code does it; randn_like; gathers of the schedule;
  mean_flat; weights[t]; mean; backward);
* cpp:   DiffusionLoss(..., backend="cpp"): the noise op (t, eps and x_t in one pass) and the loss op
  (eps regenerated from the counter, loss and gradient in one pass), backward = one scale.

    python benchmarks/bench_cpu.py                      # both shapes, uniform and SpeeD
    python benchmarks/bench_cpu.py --repeats 10 --shapes 64x3x64x64

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


def fused_step_factory(sched: NoiseSchedule, strategy_name: str, x0: torch.Tensor, pred: torch.Tensor):
    fn = DiffusionLoss(sched, strategy_name, prediction="eps", backend="cpp", seed=0)

    def step():
        x_t, t = fn.noise(x0)
        loss = fn.loss(pred, x0, t)
        pred.grad = None
        loss.backward()
        return x_t, loss

    return step, fn


def bench(shape, strategy_name, repeats, warmup, dtype=torch.float32):
    sched = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g).to(dtype)
    pred = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    eager = eager_step_factory(sched, strategy_name, x0, pred)
    fused, fn = fused_step_factory(sched, strategy_name, x0, pred)
    chosen = fn.backend(x0.device).name
    assert chosen == "cpp", f"DiffusionLoss picked {chosen!r}, the extension is not built?"
    for _ in range(warmup):
        eager()
        fused()
    times = {"eager": [], "cpp": []}
    for r in range(repeats):
        order = ("eager", "cpp") if r % 2 == 0 else ("cpp", "eager")
        for name in order:
            f = eager if name == "eager" else fused
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name, ts in times.items():
        ts = sorted(ts)
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
    speedup = rows[0]["median_ms"] / rows[1]["median_ms"]
    for r in rows:
        r["speedup_vs_eager"] = rows[0]["median_ms"] / r["median_ms"]
    return rows, speedup


def host_rows(shapes, strategy_name, repeats, block=50):
    """Host time per step at tiny shapes on one thread: where the step is all interpreter and
    dispatcher overhead. Each repeat times `block` consecutive steps (timer resolution), ours and
    plain PyTorch alternating repeat by repeat; microseconds per step."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for shape in shapes:
            sched = NoiseSchedule.linear()
            g = torch.Generator().manual_seed(0)
            x0 = torch.randn(shape, generator=g)
            pred = torch.randn(shape, generator=g).requires_grad_()
            eager = eager_step_factory(sched, strategy_name, x0, pred)
            fused, _ = fused_step_factory(sched, strategy_name, x0, pred)
            for _ in range(block):
                eager()
                fused()
            times = {"eager": [], "cpp": []}
            for r in range(repeats):
                for name in (("eager", "cpp") if r % 2 == 0 else ("cpp", "eager")):
                    f = eager if name == "eager" else fused
                    t0 = time.perf_counter()
                    for _ in range(block):
                        f()
                    times[name].append((time.perf_counter() - t0) / block)
            out = {}
            for name, ts in times.items():
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
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    host = socket.gethostname().split(".")[0] or "host"
    load_before = os.getloadavg()
    all_rows = []
    for shape_s in args.shapes.split(","):
        shape = tuple(int(s) for s in shape_s.split("x"))
        for strat in args.strategies.split(","):
            rows, speedup = bench(shape, strat, args.repeats, args.warmup)
            all_rows += rows
            e, c = rows
            print(
                f"{shape_s:>14} {strat:>8}: eager {e['median_ms']:8.2f} ms  cpp {c['median_ms']:8.2f} ms"
                f"  speed-up {speedup:5.2f}x",
                flush=True,
            )
    hrows = []
    if args.host_shapes:
        hshapes = [tuple(int(v) for v in s.split("x")) for s in args.host_shapes.split(",")]
        for strat in args.strategies.split(","):
            hrows += host_rows(hshapes, strat, args.host_repeats)
        for shape_s, strat, out in hrows:
            e, c = out["eager"], out["cpp"]
            print(f"host/step {shape_s:>10} {strat:>8}: eager {e[0]:7.1f} us  cpp {c[0]:7.1f} us"
                  f"  ratio {c[0] / e[0]:4.2f}", flush=True)
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
        "# CPU loss path: fused `cpp` backend vs eager PyTorch",
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
        f" ({'AVX2+FMA kernels' if _ext.available()['cpu_avx2'] else 'generic kernels'})",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{cmd}`",
        f"- load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f}"
        " (a shared machine: other jobs ran alongside; repeats are interleaved so both sides see the same load)",
        "- step = t, eps, x_t, weighted MSE, mean, backward to pred (no model); median of "
        f"{args.repeats} interleaved repeats after {args.warmup} warm-up steps",
        "",
        "| shape | dtype | strategy | eager ms (p20-p80) | cpp ms (p20-p80) | speed-up |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for i in range(0, len(all_rows), 2):
        e, c = all_rows[i], all_rows[i + 1]
        lines.append(
            f"| {e['shape']} | {e['dtype']} | {e['strategy']} | {e['median_ms']:.2f} ({e['p20_ms']:.2f}-{e['p80_ms']:.2f})"
            f" | {c['median_ms']:.2f} ({c['p20_ms']:.2f}-{c['p80_ms']:.2f}) | {c['speedup_vs_eager']:.2f}x |"
        )
    if hrows:
        lines += [
            "",
            "## Host time per step (one thread, tiny tensors: interpreter + dispatcher overhead)",
            "",
            f"t, eps, x_t, loss, backward; us per step, median (p20-p80) of {args.host_repeats} interleaved"
            " repeats of 50 steps each.",
            "",
            "| shape | strategy | eager us/step | cpp us/step | cpp / eager |",
            "| --- | --- | --- | --- | --- |",
        ]
        for shape_s, strat, out in hrows:
            e, c = out["eager"], out["cpp"]
            lines.append(f"| {shape_s} | {strat} | {e[0]:.1f} ({e[1]:.1f}-{e[2]:.1f}) | {c[0]:.1f} ({c[1]:.1f}-{c[2]:.1f})"
                         f" | {c[0] / e[0]:.2f} |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {base}.md and {base}.csv")


if __name__ == "__main__":
    main()
