"""Lower every Triton kernel variant to a Hopper (sm_90) cubin without a GPU.

    python tools/triton_compile_check.py

The Triton interpreter (how the kernels run on CPU in CI) accepts Python that the compiler
rejects, non-constexpr globals for one; this check runs the real compiler, with the ptxas that
ships in Triton's wheel, so a kernel that does not compile is caught on any machine.
Must run without TRITON_INTERPRET set (the decorators then build real JIT functions).
"""
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the compile check needs real JIT functions")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from speed_kernels.ops import loss, noise  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_variant(fn, types, constexprs):
    names = fn.arg_names
    missing = [a for a in names if a not in types and a not in constexprs]
    if missing:
        raise ValueError(f"signature of {fn.__name__} is missing {missing}")
    sig = {a: ("constexpr" if a in constexprs else types[a]) for a in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=TARGET)
    if not kernel.asm.get("cubin"):
        raise RuntimeError("no cubin produced")


def variants():
    for dtype in ("fp32", "bf16"):
        for has_t, mirror in ((False, False), (False, True), (True, False)):
            yield noise._noise_kernel, {
                "x0_ptr": f"*{dtype}", "xt_ptr": f"*{dtype}", "t_out_ptr": "*i64", "t_in_ptr": "*i64",
                "tab_ptr": "*fp32", "call_ptr": "*i64", "k0": "i32", "k1": "i32", "pivot": "i32",
                "n_draw": "i32", "n": "i64", "n_chunks": "i32", "T": "i32",
            }, {"HAS_T": has_t, "MIRROR": mirror, "NITER": 10, "BLOCK": 1024}
    loss_types = {
        "pred_ptr": "*bf16", "x0_ptr": "*bf16", "t_ptr": "*i64", "tab_ptr": "*fp32", "call_ptr": "*i64",
        "k0": "i32", "k1": "i32", "grad_ptr": "*bf16", "part_ptr": "*fp32", "gscale_ptr": "*fp32",
        "inv_batch": "fp32", "n": "i64", "n_chunks": "i32", "T": "i32", "n_parts": "i32",
    }
    for target, learn_sigma, compute_loss, write_grad, per_sample in (
        (0, False, True, True, False), (1, False, True, True, False), (2, False, True, True, False),
        (0, True, True, True, False), (0, True, False, True, True), (2, True, True, False, False),
    ):
        yield loss._loss_kernel, loss_types, {
            "TARGET": target, "LEARN_SIGMA": learn_sigma, "CALL_OFFSET": 1, "COMPUTE_LOSS": compute_loss,
            "WRITE_GRAD": write_grad, "PER_SAMPLE_SCALE": per_sample, "BLOCK": 2048,
        }
    for learn_sigma, reduce_mean in ((False, True), (True, False)):
        yield loss._finalize_kernel, {
            "part_ptr": "*fp32", "t_ptr": "*i64", "tab_ptr": "*fp32", "loss_ptr": "*fp32", "terms_ptr": "*fp32",
            "scale_ptr": "*fp32", "call_ptr": "*i64", "call_used_ptr": "*i64",
            "B": "i32", "n_chunks": "i32", "n_parts": "i32", "n": "i64", "T": "i32",
        }, {"CALL_OFFSET": 1, "LEARN_SIGMA": learn_sigma, "REDUCE_MEAN": reduce_mean,
            "BLOCK_B": 64, "BLOCK_C": 16, "NB_B": 4, "NB_C": 1}
    yield loss._scale_grad_kernel, {"grad_ptr": "*fp32", "state_ptr": "*fp32", "g_ptr": "*fp32", "N": "i64"}, {
        "PARITY": 0, "BLOCK": 4096}


def main():
    failures = 0
    for fn, types, constexprs in variants():
        t0 = time.time()
        label = f"{fn.__name__} {constexprs}"
        try:
            compile_variant(fn, types, constexprs)
            print(f"ok    {time.time() - t0:5.1f}s  {label}")
        except Exception as exc:  # report every failing variant, not just the first
            failures += 1
            print(f"FAIL  {label}\n{type(exc).__name__}: {exc}\n")
    print(f"{failures} variant(s) failed" if failures else "all kernel variants compile for sm_90")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
