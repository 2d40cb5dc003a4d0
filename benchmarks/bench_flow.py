"""Run: PYTHONPATH=$PWD:$PWD/python python benchmarks/bench_flow.py [--device cpu|cuda] [--shapes ...]
Time of one flow-matching loss path (FlowMatchingLoss.noise -> loss -> backward to pred) per backend,
at the op benchmark's shapes, against an eager-PyTorch version of what a diffusers script does
(density draw on the device, noise from torch.randn, weighted MSE). CUDA timing uses CUDA events
after warm-up; CPU timing the median of wall-clock repeats. Prints a markdown table."""
import argparse
import statistics
import time

import torch

from speed_kernels.flow import FlowMatchingLoss, flow_backends

SHAPES = {"256x4x32x32": (256, 4, 32, 32), "128x3x64x64": (128, 3, 64, 64), "64x3x256x256": (64, 3, 256, 256)}


def eager_script_step(x0, pred):
    """diffusers-style: logit-normal u, sigma = 1 - u, randn noise, x_t, v target, weight 1."""
    u = torch.sigmoid(torch.randn(x0.shape[0], device=x0.device))
    s = (1 - u).view(-1, *([1] * (x0.dim() - 1)))
    noise = torch.randn_like(x0)
    x_t = (1 - s) * x0 + s * noise
    loss = ((pred.float() - (noise - x0).float()) ** 2).reshape(x0.shape[0], -1).mean(1).mean()
    return loss, x_t


def timeit(fn, device, reps):
    for _ in range(2):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) * 1000 / reps
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="256x4x32x32", help="comma-separated keys of " + ", ".join(SHAPES))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    # per device: the compiled kernels and Triton (the interpreter is not a benchmark)
    kernels = ("cpp",) if args.device == "cpu" else ("triton", "cuda")
    backends = ["torch"] + [b for b in kernels if flow_backends()[b] == "available"]
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, {args.dtype}")
    print("| shape | eager script (us) | " + " | ".join(f"{b} (us)" for b in backends) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in backends) + " |")
    for key in args.shapes.split(","):
        shape = SHAPES[key]
        x0 = torch.randn(shape, device=args.device).to(dtype)
        pred = torch.randn(shape, device=args.device).to(dtype).requires_grad_(True)

        def script():
            loss, _ = eager_script_step(x0, pred)
            loss.backward()

        row = [timeit(script, args.device, args.reps)]
        for b in backends:
            lf = FlowMatchingLoss("logit_normal", backend=b, seed=0)

            def step(lf=lf):
                x_t, s = lf.noise(x0)
                lf.loss(pred, x0, s).backward()

            row.append(timeit(step, args.device, args.reps))
        print(f"| {key} | " + " | ".join(f"{v:,.0f}" for v in row) + " |")
        pred.grad = None


if __name__ == "__main__":
    main()
