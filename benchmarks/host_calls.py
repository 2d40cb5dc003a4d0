"""Host work per training step of the loss path, counted rather than timed.

Python- and C-level function calls per step (noise + loss + backward, tiny tensors, no model),
counted with sys.setprofile: unlike a wall-clock time they do not move with machine load, so two
checkouts compare exactly (run this script in each). The time per step, thread CPU time over
1000-step blocks (min and median of 5), is printed beside it as context.

    python benchmarks/host_calls.py                        # cpp backend: uniform, speed, flow
    python benchmarks/host_calls.py --backend torch-fast --cases uniform
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from speed_kernels import DiffusionLoss, NoiseSchedule  # noqa: E402
from speed_kernels.flow import FlowMatchingLoss  # noqa: E402


def make_step(case: str, backend: str, shape):
    x0 = torch.randn(shape)
    pred = torch.randn(shape, requires_grad=True)
    if case == "flow":
        lf = FlowMatchingLoss("logit_normal", backend=backend, seed=0)
    else:
        lf = DiffusionLoss(NoiseSchedule.linear(), case, backend=backend, seed=0)

    def step():
        x_t, t = lf.noise(x0)
        lf.loss(pred, x0, t).backward()

    return step


def count_calls(step, n: int = 100) -> tuple[float, float]:
    counts = {"call": 0, "c_call": 0}

    def prof(frame, event, arg):
        if event in counts:
            counts[event] += 1

    sys.setprofile(prof)
    try:
        for _ in range(n):
            step()
    finally:
        sys.setprofile(None)
    return counts["call"] / n, counts["c_call"] / n


def thread_us(step, blocks: int = 5, n: int = 1000) -> tuple[float, float]:
    out = []
    for _ in range(blocks):
        t0 = time.thread_time()
        for _ in range(n):
            step()
        out.append((time.thread_time() - t0) / n * 1e6)
    out.sort()
    return out[0], out[len(out) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="cpp")
    ap.add_argument("--cases", default="uniform,speed,flow", help="DDPM strategies, and 'flow' (logit-normal)")
    ap.add_argument("--shape", default="4x4x8x8")
    ap.add_argument("--no-time", action="store_true", help="count calls only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    shape = tuple(int(v) for v in args.shape.split("x"))
    print(f"backend {args.backend}, shape {args.shape}, torch {torch.__version__}, one thread")
    print("| case | Python calls / step | C calls / step | thread CPU us / step (min, median) |")
    print("| --- | --- | --- | --- |")
    for case in args.cases.split(","):
        step = make_step(case, args.backend, shape)
        for _ in range(20):  # warm-up: tables, counters, first-call caches
            step()
        py, c = count_calls(step)
        timing = "-" if args.no_time else "%.1f, %.1f" % thread_us(step)
        print(f"| {case} | {py:.1f} | {c:.1f} | {timing} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
