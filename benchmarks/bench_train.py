"""Training throughput: whole training steps with our loss path against plain PyTorch.

A step is what a user's training loop runs: forward, loss, backward, AdamW, EMA. Two sides share
everything but the loss path (same model init, same optimizer settings, same EMA), so the
difference is what swapping DiffusionLoss into a DiT-style train.py buys:

* plain: as DiT's train.py + GaussianDiffusion write it: t = torch.randint, eps = torch.randn_like,
  x_t from gathered sqrt(abar) / sqrt(1 - abar), then the training loss (MSE on eps, plus the VLB
  term with the model mean detached when the model learns sigma). The loss maths is
  speed_kernels.reference.loss_terms (the library's plain-PyTorch oracle), fed torch's own RNG.
* ours:  DiffusionLoss(schedule, "uniform", learn_sigma=..., backend="auto"): noise() draws t and
  eps in one fused op, loss() regenerates eps and writes the gradient in the forward pass.

Modes: eager; compile (torch.compile of model + loss); graph (the whole step, optimizer and EMA
included, captured once in a CUDA graph and replayed; CUDA only). bf16 autocast on CUDA.
Repeats alternate ours / plain (the order flips every repeat) so drift hits both sides alike.

    python benchmarks/bench_train.py --device cuda                   # the GPU table (DiT-S/B/XL, U-Net 32/64)
    python benchmarks/bench_train.py --device cpu --smoke --threads 2  # tiny models on the CPU (< 3 min)

Writes benchmarks/results/train_<device>.md and .csv (--out to change) with the machine, torch /
triton versions, git commit, SPEED_* environment and the exact command.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import gc
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import torch

_ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "python"))

from speed_kernels import DiffusionLoss, NoiseSchedule, reference  # noqa: E402
from speed_kernels.tables import ROW_SQRT_1MAB, ROW_SQRT_AB  # noqa: E402
from speed_train.models import apply_training_recipe, build_model, count_params  # noqa: E402

# name -> (model, channels, image size, batch, learn_sigma, classes)
FULL = {
    "DiT-S/2": ("DiT-S/2", 4, 32, 256, True, 1000),
    "DiT-B/2": ("DiT-B/2", 4, 32, 256, True, 1000),
    "DiT-XL/2": ("DiT-XL/2", 4, 32, 256, True, 1000),
    "unet-32": ("unet-small", 3, 32, 128, False, 0),
    "unet-64": ("unet-small", 3, 64, 64, False, 0),
}
SMOKE = {
    "DiT-micro": ("DiT-micro", 4, 8, 4, True, 10),  # host-bound: the loss path is a visible share
    "DiT-tiny": ("DiT-tiny", 4, 8, 8, True, 10),
    "unet-tiny": ("unet-tiny", 3, 16, 8, False, 0),
}
EMA_DECAY = 0.9999


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except Exception:
        pass
    return (platform.processor() or "cpu") + f", {os.cpu_count()} cores"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Side:
    """One side of the comparison: its model, optimizer, EMA and loss path, and a step()."""

    def __init__(self, impl, base_model, spec, device, mode, autocast_dtype, seed):
        name, c, size, batch, learn_sigma, classes = spec
        self.impl = impl
        self.device = device
        self.model = copy.deepcopy(base_model).to(device).train()
        self.ema = [p.detach().clone() for p in self.model.parameters()]
        params = list(self.model.parameters())
        # fused AdamW on CUDA (capturable when the step is graphed), foreach on the CPU
        kw = dict(fused=True, capturable=(mode == "graph")) if device.type == "cuda" else dict(foreach=True)
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, **kw)
        self.params = params
        g = torch.Generator().manual_seed(seed)
        self.x0 = torch.randn(batch, c, size, size, generator=g).to(device)
        self.y = torch.randint(0, classes, (batch,), generator=g).to(device) if classes else None
        self.autocast = autocast_dtype
        # autocast's cast cache must not outlive a graph capture (stale casts on replay)
        self.autocast_cache = mode != "graph"
        sched = NoiseSchedule.linear()
        self.fn = DiffusionLoss(sched, "uniform", prediction="eps", learn_sigma=learn_sigma, backend="auto", seed=seed)
        self.tab = self.fn.tables(device)
        self.T = self.fn.T
        self.learn_sigma = learn_sigma
        self.forward_loss = self._ours if impl == "ours" else self._plain
        if mode == "compile":
            self.forward_loss = torch.compile(self.forward_loss)
        self.last_loss = None
        self.graph = None

    def _model(self, x_t, t):
        if self.autocast is not None:
            with torch.autocast(self.device.type, dtype=self.autocast, cache_enabled=self.autocast_cache):
                return self.model(x_t, t, self.y)
        return self.model(x_t, t, self.y)

    def _plain(self, x0):
        # DiT train.py: t = randint(0, T, (B,)); GaussianDiffusion.training_losses: noise = randn_like,
        # q_sample, model output, MSE (+ VLB with learned sigma), mean over the batch
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        x_t = self.tab[ROW_SQRT_AB][t].view(shape) * x0 + self.tab[ROW_SQRT_1MAB][t].view(shape) * eps
        out = self._model(x_t, t)
        mse, vb = reference.loss_terms(out, x0, t, eps, self.tab, 0, self.learn_sigma)
        return (mse + vb).mean()

    def _ours(self, x0):
        x_t, t = self.fn.noise(x0)
        return self.fn.loss(self._model(x_t, t), x0, t)

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.forward_loss(self.x0)
        loss.backward()
        self.opt.step()
        with torch.no_grad():  # EMA as DiT's update_ema, one foreach kernel per dtype
            torch._foreach_lerp_(self.ema, self.params, 1.0 - EMA_DECAY)
        self.last_loss = loss.detach()

    def capture(self, warmup: int):
        """Record one whole step in a CUDA graph (after warm-up on a side stream)."""
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(max(warmup, 3)):
                self.step()
        torch.cuda.current_stream(self.device).wait_stream(s)
        # no grads before capture: backward then allocates them from the graph's pool and every
        # replay writes them afresh (existing grads would be accumulated into, replay after replay)
        self.opt.zero_grad(set_to_none=True)
        g = torch.cuda.CUDAGraph()
        self.graph = g
        with torch.cuda.graph(g):
            loss = self.forward_loss(self.x0)
            loss.backward()
            self.opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, self.params, 1.0 - EMA_DECAY)
        self.static_loss = loss
        self.step = self._replay

    def _replay(self):
        self.graph.replay()
        self.last_loss = self.static_loss


def bench_row(key, spec, device, mode, args, autocast_dtype):
    name, c, size, batch, learn_sigma, classes = spec
    torch.manual_seed(0)
    base = build_model(name, in_channels=c, image_size=size, num_classes=classes, learn_sigma=learn_sigma)
    base = apply_training_recipe(base, device, channels_last=args.channels_last and name.startswith("unet"))
    sides = {impl: Side(impl, base, spec, device, mode, autocast_dtype, seed=1) for impl in ("plain", "ours")}
    del base
    for s in sides.values():
        if mode == "graph":
            s.capture(args.warmup)
        else:
            for _ in range(args.warmup):
                s.step()
    _sync(device)
    times = {"plain": [], "ours": []}
    peak = {}
    resident = {}
    for r in range(args.repeats):
        for impl in (("plain", "ours") if r % 2 == 0 else ("ours", "plain")):
            s = sides[impl]
            if device.type == "cuda":
                _sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            for _ in range(args.steps_per_repeat):
                s.step()
            _sync(device)
            times[impl].append((time.perf_counter() - t0) / args.steps_per_repeat)
            if device.type == "cuda":
                peak[impl] = max(peak.get(impl, 0), torch.cuda.max_memory_allocated(device) - before)
                resident[impl] = before
    rows = []
    for impl in ("plain", "ours"):
        ts = times[impl]
        q = statistics.quantiles(ts, n=5) if len(ts) > 1 else [ts[0]] * 4
        med = statistics.median(ts)
        loss = float(sides[impl].last_loss)
        rows.append({
            "model": key, "arch": name, "image": f"{c}x{size}x{size}", "batch": batch, "mode": mode, "impl": impl,
            "ms_median": med * 1e3, "ms_p20": q[0] * 1e3, "ms_p80": q[3] * 1e3, "images_per_s": batch / med,
            "step_peak_mib": peak.get(impl, float("nan")) / 2**20,
            "resident_mib": resident.get(impl, float("nan")) / 2**20,
            "params": count_params(sides[impl].model), "out_channels": sides[impl].model.out_channels,
            "final_loss": loss, "repeats": args.repeats, "steps_per_repeat": args.steps_per_repeat,
            "backend": sides["ours"].fn.backend(device).name, "status": "ok",
        })
    plain, ours = rows
    ours["speedup"] = plain["ms_median"] / ours["ms_median"]
    plain["speedup"] = 1.0
    del sides
    gc.collect()  # a graphed Side refers to itself (step = its replay method): free it now
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


FIELDS = ["model", "arch", "image", "batch", "mode", "impl", "backend", "ms_median", "ms_p20", "ms_p80",
          "images_per_s", "speedup", "step_peak_mib", "resident_mib", "params", "out_channels", "final_loss",
          "repeats", "steps_per_repeat", "status"]


def write_results(rows, args, device, base, load, elapsed):
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.4g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in FIELDS})
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = "not installed"
    spreads = [(r["ms_p80"] - r["ms_p20"]) / r["ms_median"] for r in rows if r.get("status") == "ok"]
    env = {k: v for k, v in os.environ.items() if k.startswith("SPEED_")}
    lines = [
        f"# Training throughput on {device.type}: our loss path vs plain PyTorch (whole steps)",
        "",
        f"- machine: {_machine(device)}; torch threads {torch.get_num_threads()}",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_v}, Python {platform.python_version()}",
        f"- git commit: {_git_commit()}; SPEED_* env: {env or 'none'}",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; wall time {elapsed:.0f} s",
        f"- command: `{args.command}`",
        (f"- load average before / after: {load[0]:.2f} / {load[1]:.2f}" if load else "- load average: n/a"),
        "- step = forward, loss, backward, AdamW, EMA; plain and ours share model init, optimizer and EMA and"
        " differ only in the loss path (plain: torch.randint / randn_like / gathers / reference VLB maths;"
        " ours: DiffusionLoss fused ops)"
        + ("; bf16 autocast" if args.autocast else "; fp32"),
        f"- median (p20-p80) of {args.repeats} repeats of {args.steps_per_repeat} steps, ours / plain"
        f" interleaved, after {args.warmup} warm-up steps",
        "- run-to-run noise: (p80 - p20) / median is "
        + (f"{statistics.median(spreads) * 100:.0f} % typical, {max(spreads) * 100:.0f} % worst" if spreads else "n/a")
        + " here; a speed-up inside that band is a tie",
        "- step peak = peak allocated during the step above what was resident before it (CUDA only)",
        "",
        "| model | image | batch | mode | plain ms/step (p20-p80) | ours ms/step (p20-p80) | plain img/s |"
        " ours img/s | speed-up | step peak MiB plain / ours |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    i = 0
    while i < len(rows):
        r = rows[i]
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {r.get('image', '')} | {r.get('batch', '')} | {r['mode']} | {r['status']} |"
                         " | | | | |")
            i += 1
            continue
        p, o = rows[i], rows[i + 1]
        mem = "n/a" if p["step_peak_mib"] != p["step_peak_mib"] else f"{p['step_peak_mib']:.0f} / {o['step_peak_mib']:.0f}"
        lines.append(
            f"| {p['model']} | {p['image']} | {p['batch']} | {p['mode']} | {p['ms_median']:.2f} ({p['ms_p20']:.2f}-"
            f"{p['ms_p80']:.2f}) | {o['ms_median']:.2f} ({o['ms_p20']:.2f}-{o['ms_p80']:.2f}) | {p['images_per_s']:.0f}"
            f" | {o['images_per_s']:.0f} | {o['speedup']:.2f}x | {mem} |"
        )
        i += 2
    xl = [r for r in rows if r.get("arch") == "DiT-XL/2" and r.get("status") == "ok" and r["impl"] == "ours"]
    if xl:
        best = max(xl, key=lambda r: r["images_per_s"])
        lines += [
            "",
            f"Context, not a race: DiT-XL/2 here {best['images_per_s']:.0f} img/s ({best['mode']}, batch"
            f" {best['batch']}, latents 4x32x32, {_machine(device)}). fast-DiT's README"
            " (github.com/chuanyangjin/fast-DiT) reports 0.84 steps/s at batch 128 on one A100 with fp16,"
            " gradient checkpointing and pre-extracted latents, i.e. about 108 img/s.",
        ]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny models (DiT-tiny, unet-tiny), few repeats")
    ap.add_argument("--models", default=None, help=f"comma list of {', '.join(FULL)} / {', '.join(SMOKE)}")
    ap.add_argument("--batch", type=int, default=0, help="override every model's batch size")
    ap.add_argument("--modes", default=None, help="eager,compile,graph (default: all on CUDA, eager on the CPU)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--steps-per-repeat", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads on the CPU (0: torch's default; 1 with --smoke)")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    ap.add_argument("--channels-last", action="store_true", help="U-Net in channels-last memory format (both sides)")
    ap.add_argument("--time-budget-s", type=float, default=0, help="skip the remaining rows after this many seconds")
    ap.add_argument("--out", default=os.path.join(_ROOT, "benchmarks", "results"))
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    args = ap.parse_args(argv)
    args.command = "python " + " ".join(shlex.quote(a) for a in ([os.path.relpath(sys.argv[0])] if argv is None
                                                                  else ["benchmarks/bench_train.py"])
                                        + (sys.argv[1:] if argv is None else list(argv)))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.smoke and device.type == "cpu":
        # tiny models gain nothing from threads, and on a loaded 2-core box OpenMP workers that
        # wait on each other made a 30 ms step take 2 s
        torch.set_num_threads(1)
    table = SMOKE if args.smoke else FULL
    keys = args.models.split(",") if args.models else list(table)
    specs = []
    for k in keys:
        spec = SMOKE.get(k) or FULL.get(k)
        if spec is None:
            raise ValueError(f"--models: unknown {k!r}; known: {', '.join(list(FULL) + list(SMOKE))}")
        if args.batch:
            spec = spec[:3] + (args.batch,) + spec[4:]
        specs.append((k, spec))
    modes = (args.modes or ("eager,graph,compile" if device.type == "cuda" else "eager")).split(",")
    for m in modes:
        if m not in ("eager", "compile", "graph"):
            raise ValueError(f"--modes: unknown mode {m!r} (eager, compile, graph)")
    if "graph" in modes and device.type != "cuda":
        raise ValueError("--modes graph needs --device cuda")
    small = args.smoke or device.type == "cpu"
    args.repeats = args.repeats or (6 if small else 10)
    args.steps_per_repeat = args.steps_per_repeat or (2 if small else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if small else 3)
    args.autocast = device.type == "cuda" and not args.fp32
    autocast_dtype = torch.bfloat16 if args.autocast else None

    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"train_{device.type}" + (f"_{args.tag}" if args.tag else ""))
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    t_start = time.perf_counter()
    rows = []
    # eager rows of every model first, then graph, then compile (slowest to prepare): a time budget
    # cuts the least important rows
    for mode in modes:
        for key, spec in specs:
            if args.time_budget_s and time.perf_counter() - t_start > args.time_budget_s:
                rows.append({"model": key, "image": f"{spec[1]}x{spec[2]}x{spec[2]}", "batch": spec[3], "mode": mode,
                             "impl": "-", "status": "skipped (time budget)"})
                continue
            try:
                new = bench_row(key, spec, device, mode, args, autocast_dtype)
            except Exception as exc:  # one failing row (OOM, a compile error) must not lose the others
                gc.collect()
                msg = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                rows.append({"model": key, "image": f"{spec[1]}x{spec[2]}x{spec[2]}", "batch": spec[3], "mode": mode,
                             "impl": "-", "status": msg})
                print(f"{key:>10} {mode:>8}: {msg}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            else:
                rows += new
                p, o = new
                print(f"{key:>10} {mode:>8}: plain {p['ms_median']:8.2f} ms  ours {o['ms_median']:8.2f} ms"
                      f"  ({o['images_per_s']:.0f} img/s, speed-up {o['speedup']:.2f}x)", flush=True)
            load1 = os.getloadavg() if hasattr(os, "getloadavg") else None
            write_results(rows, args, device, base, (load0[0], load1[0]) if load0 else None,
                          time.perf_counter() - t_start)
    print(f"wrote {base}.md and {base}.csv")
    return rows


if __name__ == "__main__":
    main()
