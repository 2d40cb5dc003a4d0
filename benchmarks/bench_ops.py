#!/usr/bin/env python3
"""Op-level benchmark of the diffusion loss path: noise + loss forward + backward to pred.

Side by side, in one run, on one device (`triton_api`: the same kernels through DiffusionLoss):
  eager    plain PyTorch written as DiT / diffusers write it: torch.randint (uniform) or
           torch.multinomial (SpeeD, with the official mirrored half batch), torch.randn_like,
           gathers of the sqrt(ab) tables, mean_flat, weights[t], .mean(), backward()
           (the learned-sigma case is DiT's hybrid: MSE + VLB with the mean detached);
           low-precision inputs are upcast to float32 for the loss, as diffusers does.
  compile  torch.compile of the same forward (compiled once per variant; backward by AOTAutograd)
  triton   our fused kernels (speed_kernels.ops.triton_backend), called through the backend
  cuda     the compiled extension's CUDA backend, when speed_kernels.backends says it is available
each timed eagerly and as a replayed CUDA graph of the whole step, with
triton.testing.do_bench (median and p20/p80 in microseconds). GB/s counts the compulsory bytes
(read x0, write x_t, read pred (+ x0 for v / x0 / learned sigma), write the gradient) and is
compared with a measured device-to-device copy. Peak memory is the max_memory_allocated delta of
one step.

    PYTHONPATH=$PWD:$PWD/python python3 benchmarks/bench_ops.py           # GPU, < 4 min on an H100
    PYTHONPATH=$PWD:$PWD/python python3 benchmarks/bench_ops.py --smoke   # CPU, Triton interpreter

Writes benchmarks/results/ops_<gpu>.md and .csv (GPU name, versions, date, command).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shape: catches Python errors")
    p.add_argument("--out", default=None,
                   help="results folder (default benchmarks/results; --smoke: /tmp/speed_bench_smoke)")
    p.add_argument("--shapes", default=None, help="e.g. 256x4x32x32,64x3x256x256")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--strategies", default="uniform,speed,learned_sigma")
    p.add_argument("--impls", default="eager,compile,triton,triton_api,cuda",
                   help="triton_api = our kernels through the public DiffusionLoss object (its host overhead included)")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replay timings")
    p.add_argument("--compile-budget-s", type=float, default=None,
                   help="stop compiling new torch.compile variants after this many seconds of compile "
                        "time (default 110 on a GPU, 40 in --smoke)")
    p.add_argument("--warmup-ms", type=float, default=10.0)
    p.add_argument("--rep-ms", type=float, default=40.0)
    p.add_argument("--no-sweep", action="store_true", help="skip the Triton configuration sweep")
    p.add_argument("--sweep-only", action="store_true", help="only the Triton configuration sweep")
    p.add_argument("--sweep-shapes", default="256x4x32x32,64x3x256x256")
    p.add_argument("--sweep-budget-s", type=float, default=90.0)
    p.add_argument("--time-budget-s", type=float, default=150.0,
                   help="skip the variants (and the sweep) that would start after this many seconds")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = "/tmp/speed_bench_smoke" if args.smoke else os.path.join(HERE, "results")
    if args.compile_budget_s is None:
        args.compile_budget_s = 40.0 if args.smoke else 110.0
    return args


ARGS = parse_args()
if ARGS.smoke:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton kernels
sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import triton  # noqa: E402

from speed_kernels import reference, rng  # noqa: E402
from speed_kernels import strategies as S  # noqa: E402
from speed_kernels.backends import backends as list_backends  # noqa: E402
from speed_kernels.backends import numerics_env, select  # noqa: E402
from speed_kernels.op_schema import DiffusionArgs  # noqa: E402
from speed_kernels.schedules import NoiseSchedule  # noqa: E402
from speed_kernels.tables import (  # noqa: E402
    ROW_LOG_BETA,
    ROW_POST_LOGVAR,
    ROW_POST_X0,
    ROW_POST_XT,
    ROW_SQRT_1MAB,
    ROW_SQRT_AB,
    ROW_WEIGHT,
    ROW_X0HAT_OUT,
    ROW_X0HAT_XT,
    build_tables,
)

DEV = torch.device("cpu" if ARGS.smoke else "cuda")
# One compiled function per variant shares eager_forward's code object: without a higher limit
# Dynamo would silently fall back to eager after 8 variants.
for _name in ("cache_size_limit", "recompile_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 256)
GPU = not ARGS.smoke
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
T = 1000
LN2 = math.log(2.0)


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------ timing


def bench(fn, grad_to_none):
    """(median, p20, p80) in microseconds."""
    if GPU:
        ms = triton.testing.do_bench(fn, warmup=ARGS.warmup_ms, rep=ARGS.rep_ms,
                                     quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
        return tuple(x * 1e3 for x in ms)
    times = []
    for i in range(4):
        for x in grad_to_none:
            x.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    times = sorted(times[1:])
    return statistics.median(times), times[0], times[-1]


def copy_bandwidth_gbs():
    n = (1 << 28) if GPU else (1 << 22)  # 1 GiB of fp32 on the GPU
    a = torch.empty(n, dtype=torch.float32, device=DEV)
    b = torch.empty_like(a)
    med, _, _ = bench(lambda: b.copy_(a), [])
    del a, b
    return 2 * n * 4 / (med * 1e-6) / 1e9


def peak_mem_mb(step, grad_to_none):
    if not GPU:
        return float("nan")
    for x in grad_to_none:
        x.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for x in grad_to_none:
        x.grad = None
    return peak / 2**20


def graph_of(step, grad_to_none):
    """Capture one whole step in a CUDA graph (after warm-up on a side stream)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            for x in grad_to_none:
                x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(s)
    for x in grad_to_none:
        x.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    torch.cuda.synchronize()
    return g


# ------------------------------------------------------------------------------------ variants


class Variant:
    """One (shape, dtype, strategy) case: the tables, the eager step, our step."""

    def __init__(self, shape, dtype, strategy):
        self.shape, self.dtype, self.strategy = shape, dtype, strategy
        sched = NoiseSchedule.linear(T)
        self.learn_sigma = strategy == "learned_sigma"
        if strategy == "speed":
            strat = S.get("speed", k=5, lam=0.6, tau=700)
        else:  # DiT's default (learned sigma) samples uniformly too
            strat = S.get("uniform")
        self.mirror = bool(strat.mirror)
        self.pivot = int(strat.pivot(sched)) if self.mirror else 0
        self.uniform_t = strategy != "speed"
        self.sched, self.strat = sched, strat
        probs = strat.probs(sched)
        weights = strat.weights(sched, prediction="eps")
        self.tables = build_tables(sched, probs, weights, "eps", self.learn_sigma).to(DEV)
        self.probs = torch.as_tensor(probs, dtype=torch.float32, device=DEV)
        self.k0, self.k1 = rng.fold_key(1234)
        self.call = torch.zeros(1, dtype=torch.int64, device=DEV)
        self.args = DiffusionArgs(self.tables, self.k0, self.k1, self.call, 0, self.learn_sigma, self.mirror, self.pivot)
        B, C = shape[0], shape[1]
        self.x0 = torch.randn(shape, device=DEV).clamp(-1, 1).to(dtype)
        pshape = (B, 2 * C if self.learn_sigma else C, *shape[2:])
        self.pred = torch.randn(pshape, device=DEV).to(dtype).requires_grad_()
        n = self.x0.numel()
        esz = self.x0.element_size()
        npred = self.pred.numel()
        # compulsory passes: read x0, write x_t, read pred (+ x0), write grad
        self.bytes = esz * (2 * n + 2 * npred + (n if self.learn_sigma else 0))

    # -- plain PyTorch, the way DiT / diffusers write it
    def eager_forward(self, x0, pred):
        tab = self.tables
        B = x0.shape[0]
        if self.uniform_t:
            t = torch.randint(0, T, (B,), device=x0.device)
        else:
            n_draw = B // 2 + 1
            t = torch.multinomial(self.probs, n_draw, replacement=True)
            t = torch.cat([t, (t - self.pivot).abs()])[:B]
        shape = (B,) + (1,) * (x0.dim() - 1)
        x0f = x0.float()
        noise = torch.randn_like(x0f)
        x_t = tab[ROW_SQRT_AB][t].view(shape) * x0f + tab[ROW_SQRT_1MAB][t].view(shape) * noise
        x_t = x_t.to(x0.dtype)  # what the model would get
        C = x0.shape[1]
        out = pred[:, :C].float() if self.learn_sigma else pred.float()
        mse = ((noise - out) ** 2).mean(dim=list(range(1, x0.dim())))  # mean_flat
        if not self.learn_sigma:
            if not self.uniform_t:
                mse = mse * tab[ROW_WEIGHT][t]
            return mse.mean()
        # DiT / guided-diffusion hybrid: VLB with the model mean detached
        v = pred[:, C:].float()
        xt = x_t.float()
        g = lambda row: tab[row][t].view(shape)  # noqa: E731  (_extract_into_tensor)
        min_log, max_log = g(ROW_POST_LOGVAR), g(ROW_LOG_BETA)
        frac = (v + 1) / 2
        model_log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = g(ROW_X0HAT_XT) * xt + g(ROW_X0HAT_OUT) * out.detach()
        model_mean = g(ROW_POST_X0) * pred_xstart + g(ROW_POST_XT) * xt
        true_mean = g(ROW_POST_X0) * x0f + g(ROW_POST_XT) * xt
        kl = 0.5 * (-1.0 + model_log_variance - min_log + torch.exp(min_log - model_log_variance)
                    + (true_mean - model_mean) ** 2 * torch.exp(-model_log_variance))
        kl = kl.mean(dim=list(range(1, x0.dim()))) / LN2
        nll = -reference.discretized_gaussian_log_likelihood(x0f, model_mean, 0.5 * model_log_variance)
        nll = nll.mean(dim=list(range(1, x0.dim()))) / LN2
        vb = torch.where(t == 0, nll, kl)
        return (mse + vb).mean()

    def step_eager(self):
        self.eager_forward(self.x0, self.pred).backward()

    def step_compiled(self, compiled):
        return lambda: compiled(self.x0, self.pred).backward()

    def step_api(self):
        from speed_kernels.loss import DiffusionLoss

        fn = DiffusionLoss(self.sched, strategy=self.strat, prediction="eps", learn_sigma=self.learn_sigma,
                           backend="triton", seed=1234, check_inputs=False)

        def step():
            x_t, t = fn.noise(self.x0)
            fn.loss(self.pred, self.x0, t).backward()
        return step

    def step_backend(self, backend):
        def step():
            x_t, t = backend.noise(self.x0, None, self.args)
            loss, _ = backend.loss(self.pred, self.x0, t, self.args, True)
            loss.backward()
        return step


# ------------------------------------------------------------------------------------ main


def gpu_name():
    return torch.cuda.get_device_name() if GPU else f"cpu-interpreter ({platform.processor() or platform.machine()})"


def main():
    t_start = time.time()
    shapes = ARGS.shapes or ("2x4x8x8" if ARGS.smoke else "256x4x32x32,128x3x64x64,64x3x256x256")
    shapes = [tuple(int(v) for v in s.split("x")) for s in shapes.split(",")]
    dtypes = [] if ARGS.sweep_only else ARGS.dtypes.split(",")
    strategies = ARGS.strategies.split(",")
    impls = ARGS.impls.split(",")
    avail = list_backends()
    log(f"device: {gpu_name()}  torch {torch.__version__}  triton {triton.__version__}")
    log(f"backends: {avail}")
    backend_objs = {}
    if "triton" in impls:
        backend_objs["triton"] = select("triton", DEV)
    if "cuda" in impls and GPU and avail.get("cuda") == "available":
        backend_objs["cuda"] = select("cuda", DEV)
    bw = copy_bandwidth_gbs()
    log(f"measured copy bandwidth: {bw:.0f} GB/s")
    rows = []
    compile_spent = 0.0
    modes = ["eager"] + ([] if (ARGS.no_graph or not GPU) else ["graph"])
    # fp32 first (the targets), then the other dtypes; results are written after every variant
    for dname in dtypes:
        for shape in shapes:
            for strat in strategies:
                if time.time() - t_start > ARGS.time_budget_s:
                    rows.append(dict(shape="x".join(map(str, shape)), dtype=dname, strategy=strat, impl="all",
                                     mode="", note="skipped (time budget)"))
                    continue
                var = Variant(shape, DTYPES[dname], strat)
                floor_us = var.bytes / (bw * 1e9) * 1e6
                steps = {}
                notes = {}
                if "eager" in impls:
                    steps["eager"] = var.step_eager
                if "compile" in impls:
                    if compile_spent < ARGS.compile_budget_s:
                        t0 = time.time()
                        try:
                            compiled = torch.compile(var.eager_forward)
                            compiled(var.x0, var.pred).backward()  # compile forward + backward now
                            var.pred.grad = None
                            steps["compile"] = var.step_compiled(compiled)
                        except Exception as exc:  # report, keep going
                            notes["compile"] = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
                        compile_spent += time.time() - t0
                    else:
                        notes["compile"] = "skipped (compile-time budget)"
                for name, b in backend_objs.items():
                    steps[name] = var.step_backend(b)
                if "triton_api" in impls and "triton" in backend_objs:
                    try:
                        steps["triton_api"] = var.step_api()
                    except Exception as exc:
                        notes["triton_api"] = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
                base = None
                for impl in impls:
                    if impl in notes and impl not in steps:
                        rows.append(dict(shape="x".join(map(str, shape)), dtype=dname, strategy=strat, impl=impl,
                                         mode="eager", note=notes[impl]))
                # every eager timing first, then the graph captures (a failed capture cannot
                # disturb the eager numbers)
                for mode in modes:
                    for impl in [i for i in impls if i in steps]:
                        row = dict(shape="x".join(map(str, shape)), dtype=dname, strategy=strat, impl=impl, mode=mode)
                        try:
                            if mode == "eager":
                                fn = steps[impl]
                                row["peak_mem_mb"] = peak_mem_mb(fn, [var.pred])
                            else:
                                g = graph_of(steps[impl], [var.pred])
                                fn = g.replay
                            med, p20, p80 = bench(fn, [var.pred] if mode == "eager" else [])
                            row.update(median_us=med, p20_us=p20, p80_us=p80,
                                       gbps=var.bytes / (med * 1e-6) / 1e9)
                            row["pct_copy_bw"] = 100.0 * row["gbps"] / bw
                            row["floor_us"] = floor_us
                            if impl == "eager" and mode == "eager":
                                base = med
                            if base:
                                row["speedup_vs_eager"] = base / med
                        except Exception as exc:
                            row["note"] = f"failed: {type(exc).__name__}: {str(exc)[:100]}"
                            if GPU:
                                torch.cuda.synchronize()
                        var.pred.grad = None
                        g = None
                        rows.append(row)
                        log(fmt_row(row))
                del var, steps
                # write after every variant: a run cut short by a timeout still leaves its numbers
                write_results(rows, [], bw, time.time() - t_start, quiet=True)
                if GPU:
                    torch.cuda.empty_cache()
    late = time.time() - t_start > ARGS.time_budget_s and not ARGS.sweep_only
    sweep = [] if (ARGS.no_sweep or ARGS.smoke or late or "triton" not in backend_objs) else block_sweep(backend_objs["triton"], bw)
    kernels = []
    if GPU and not ARGS.no_sweep and "triton" in backend_objs:
        try:
            kernels = kernel_breakdown(backend_objs["triton"])
        except Exception as exc:  # the profiler is a nicety: report and go on
            log(f"kernel breakdown failed: {type(exc).__name__}: {exc}")
    elapsed = time.time() - t_start
    write_results(rows, sweep, bw, elapsed, kernels=kernels)
    log(f"done in {elapsed:.0f} s")
    failed = [r for r in rows if str(r.get("note", "")).startswith("failed") and r["impl"] in ("triton", "cuda")
              and r["mode"] == "eager"]
    return 1 if failed else 0


SWEEP_CONFIGS = [(512, 4), (1024, 4), (2048, 4), (1024, 8), (2048, 8), (4096, 8)]


def block_sweep(backend, bw):
    """Triton (BLOCK, num_warps) configurations, timed as CUDA-graph replays (device time,
    not host time) for the whole loss path and for its two halves: `noise` (noise kernel +
    counter advance) and `loss` (loss kernel + reduction + backward). Informs block_config."""
    out = []
    saved = {k: os.environ.get(k) for k in ("SPEED_TRITON_BLOCK", "SPEED_TRITON_WARPS")}
    shapes = [tuple(int(v) for v in s.split("x")) for s in ARGS.sweep_shapes.split(",")]
    t0 = time.time()
    try:
        for shape in shapes:
            for strat in ("speed", "learned_sigma"):
                var = Variant(shape, DTYPES["fp32"], strat)
                for block, warps in SWEEP_CONFIGS:
                    if time.time() - t0 > ARGS.sweep_budget_s:
                        log("sweep: time budget reached")
                        return out
                    for k, v in (("SPEED_TRITON_BLOCK", block), ("SPEED_TRITON_WARPS", warps)):
                        if v:
                            os.environ[k] = str(v)
                        else:
                            os.environ.pop(k, None)
                    row = dict(shape="x".join(map(str, shape)), strategy=strat, block=block or "default",
                               warps=warps or "default")
                    try:
                        _, t_fixed = backend.noise(var.x0, None, var.args)

                        def noise_only():
                            backend.noise(var.x0, None, var.args)

                        def loss_only():
                            loss, _ = backend.loss(var.pred, var.x0, t_fixed, var.args, True)
                            loss.backward()

                        for part, fn in (("step", var.step_backend(backend)), ("noise", noise_only), ("loss", loss_only)):
                            g = graph_of(fn, [var.pred])
                            med, _, _ = bench(g.replay, [])
                            row[f"{part}_us"] = med
                            var.pred.grad = None
                            del g
                        row["pct_copy_bw"] = 100.0 * var.bytes / (row["step_us"] * 1e-6) / 1e9 / bw
                    except Exception as exc:
                        row["note"] = f"failed: {type(exc).__name__}: {str(exc)[:100]}"
                        torch.cuda.synchronize()
                    out.append(row)
                    log("sweep " + " ".join(f"{k}={fmt(v)}" for k, v in row.items()))
                del var
                torch.cuda.empty_cache()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


def kernel_breakdown(backend):
    """Device time per kernel of our loss path (torch.profiler / CUPTI, 20 eager steps), fp32
    speed: where a step's time goes at each shape (launch gaps are not in these sums)."""
    from torch.profiler import ProfilerActivity, profile

    out = []
    shapes = [tuple(int(v) for v in s.split("x")) for s in ARGS.sweep_shapes.split(",")]
    for shape in shapes:
        var = Variant(shape, DTYPES["fp32"], "speed")
        step = var.step_backend(backend)
        for _ in range(3):
            step()
            var.pred.grad = None
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                step()
                var.pred.grad = None
            torch.cuda.synchronize()
        total = 0.0
        for ev in prof.key_averages():
            # kernel events only (a CPU op's device total would count its kernels twice)
            if not str(getattr(ev, "device_type", "")).endswith("CUDA"):
                continue
            dev_us = getattr(ev, "self_device_time_total", None)
            if dev_us is None:
                dev_us = getattr(ev, "self_cuda_time_total", 0.0)
            if dev_us and ev.count:
                per_step = dev_us / 20.0
                total += per_step
                out.append(dict(shape="x".join(map(str, shape)), kernel=ev.key[:60], us_per_step=per_step,
                                calls_per_step=ev.count / 20.0))
        out.append(dict(shape="x".join(map(str, shape)), kernel="(sum of kernel times)", us_per_step=total,
                        calls_per_step=""))
        for r in out[-8:]:
            log("kernels " + " ".join(f"{k}={fmt(v)}" for k, v in r.items()))
        del var
    return out


FIELDS = ["shape", "dtype", "strategy", "impl", "mode", "median_us", "p20_us", "p80_us", "speedup_vs_eager",
          "gbps", "pct_copy_bw", "floor_us", "peak_mem_mb", "note"]


def fmt(v, nd=1):
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{nd}f}"
    return str(v)


def fmt_row(r):
    return (f"{r['shape']:>14} {r['dtype']:>5} {r['strategy']:>13} {r['impl']:>8} {r['mode']:>6} "
            f"{fmt(r.get('median_us')):>9} us  x{fmt(r.get('speedup_vs_eager')):>6}  "
            f"{fmt(r.get('gbps'), 0):>6} GB/s {fmt(r.get('pct_copy_bw'), 0):>4}%  "
            f"mem {fmt(r.get('peak_mem_mb'))} MB {r.get('note', '')}")


def git_commit() -> str:
    """Short HEAD of the tree that ran (with '+changes' when it differs from HEAD), or 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head + ("+changes" if dirty else "")) if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_results(rows, sweep, bw, elapsed, quiet=False, kernels=()):
    os.makedirs(ARGS.out, exist_ok=True)
    name = re.sub(r"[^a-z0-9]+", "_", gpu_name().lower()).strip("_")
    if ARGS.smoke:
        name = "smoke_cpu"
    base = os.path.join(ARGS.out, f"ops_{name}")
    cmd = "PYTHONPATH=$PWD:$PWD/python python3 benchmarks/bench_ops.py " + " ".join(sys.argv[1:])
    header = {
        "gpu": gpu_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": getattr(torch.version, "cuda", None),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": cmd.strip(),
        "commit": git_commit(),
        "copy_bandwidth_gbs": f"{bw:.0f}",
        "SPEED_env": numerics_env() or "none",  # knobs that change numerics or launch shapes
        "elapsed_s": f"{elapsed:.0f}",
    }
    with open(base + ".csv", "w", newline="") as f:
        for k, v in header.items():
            f.write(f"# {k}: {v}\n")
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: fmt(r.get(k), 3) for k in FIELDS})
    lines = [f"# Loss-path op benchmark: {header['gpu']}", ""]
    lines += [f"- {k}: `{v}`" for k, v in header.items()]
    lines += [
        "",
        "Loss path = noise (t, eps, x_t) + loss forward + backward to pred. µs per step (median, "
        "[p20, p80]) from `triton.testing.do_bench`; `graph` = replay of the whole step captured in a "
        "CUDA graph. GB/s counts the compulsory bytes (read x0, write x_t, read pred (+x0 for learned "
        "sigma), write grad); % is of the measured copy bandwidth; floor = those bytes at copy speed. "
        "Peak memory: max_memory_allocated delta of one eager step. eager = plain PyTorch as DiT / "
        "diffusers write it (randint / multinomial + mirror, randn_like, table gathers, mean_flat).",
        "",
        "| shape | dtype | strategy | impl | mode | µs median [p20, p80] | × eager | GB/s | % copy bw | floor µs | peak MB | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        med = r.get("median_us")
        cell = f"{fmt(med)} [{fmt(r.get('p20_us'))}, {fmt(r.get('p80_us'))}]" if med is not None else ""
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['strategy']} | {r['impl']} | {r['mode']} | {cell} | "
            f"{fmt(r.get('speedup_vs_eager'))} | {fmt(r.get('gbps'), 0)} | {fmt(r.get('pct_copy_bw'), 0)} | "
            f"{fmt(r.get('floor_us'))} | {fmt(r.get('peak_mem_mb'))} | {r.get('note', '')} |"
        )
    if sweep:
        lines += ["", "Triton configuration sweep, fp32, CUDA-graph replay, µs median: the whole step, and its "
                  "halves (noise = noise kernel + counter advance; loss = loss kernel + reduction + backward).", "",
                  "| shape | strategy | BLOCK | warps | step µs | noise µs | loss µs | % copy bw | note |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sweep:
            lines.append(f"| {r['shape']} | {r['strategy']} | {r['block']} | {r['warps']} | "
                         f"{fmt(r.get('step_us'))} | {fmt(r.get('noise_us'))} | {fmt(r.get('loss_us'))} | "
                         f"{fmt(r.get('pct_copy_bw'), 0)} | {r.get('note', '')} |")
    if kernels:
        lines += ["", "Device time per kernel of our loss path (Triton backend, fp32, SpeeD; torch.profiler over 20 "
                  "eager steps; launch gaps excluded):", "",
                  "| shape | kernel | µs per step | calls per step |", "| --- | --- | --- | --- |"]
        for r in kernels:
            lines.append(f"| {r['shape']} | `{r['kernel']}` | {fmt(r['us_per_step'], 2)} | {fmt(r['calls_per_step'])} |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    if not quiet:
        log(f"wrote {base}.md and {base}.csv")


if __name__ == "__main__":
    sys.exit(main())
