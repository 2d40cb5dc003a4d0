"""Run: PYTHONPATH=$PWD:$PWD/python python3 benchmarks/aot_compile_flow.py (no GPU needed).
AOT-compile every variant of the flow-matching Triton kernels (ops/flow_noise.py, ops/flow_loss.py)
for sm_90: catches compiler errors the interpreter misses; prints registers and spills."""
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from speed_kernels.ops import flow_loss as FL  # noqa: E402
from speed_kernels.ops import flow_noise as FN  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DIV = [["tt.divisibility", 16]]
failures = []


def compile_(fn, sig, consts, warps, label):
    names = fn.arg_names
    signature = {k: sig.get(k, "constexpr") for k in names}
    for k in consts:
        signature[k] = "constexpr"
    attrs = {(names.index(k),): DIV for k, v in sig.items() if v.startswith("*")}
    src = ASTSource(fn, signature, constexprs=consts, attrs=attrs)
    try:
        k = triton.compile(src, target=TARGET, options={"num_warps": warps})
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(k.asm["ptx"])
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
        r = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", "/dev/null"], capture_output=True, text=True)
        info = " ".join(re.findall(r"Used \d+ registers|\d+ bytes spill stores", r.stderr))
        print(f"OK   {label:48s} {info}")
    except Exception as e:  # noqa: BLE001
        failures.append(label)
        print(f"FAIL {label}: {type(e).__name__}: {str(e)[:1500]}")


for dt in os.environ.get("DTYPES", "fp32,bf16").split(","):
    for has_sigma in (False, True):
        for even in (True, False):
            sig = dict(x0_ptr=f"*{dt}", xt_ptr=f"*{dt}", sigma_out_ptr="*fp32", sigma_in_ptr="*fp32", tab_ptr="*fp32",
                       call_ptr="*i64", k0="i32", k1="i32", n="i32", n_chunks="i32", NQ="i32")
            compile_(FN._flow_noise_kernel, sig, dict(HAS_SIGMA=has_sigma, BLOCK=4096, EVEN=even), 8,
                     f"flow_noise {dt} has_sigma={has_sigma} even={even}")
    for target in (0, 1, 2):
        for write_grad in (False, True):
            sig = dict(pred_ptr=f"*{dt}", x0_ptr=f"*{dt}", w_ptr="*fp32", call_ptr="*i64", k0="i32", k1="i32",
                       grad_ptr=f"*{dt}", part_ptr="*fp32", n="i32", n_chunks="i32")
            compile_(FL._flow_loss_kernel, sig, dict(TARGET=target, WRITE_GRAD=write_grad, BLOCK=4096, EVEN=False), 8,
                     f"flow_loss {dt} target={target} grad={write_grad}")

print(f"{len(failures)} variant(s) failed: {failures}" if failures else "all flow kernel variants compile for sm_90")
sys.exit(1 if failures else 0)
