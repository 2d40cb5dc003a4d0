"""Run: PYTHONPATH=$PWD:$PWD/python python3 benchmarks/aot_compile_check.py [noise|loss|misc] (no GPU needed).
AOT-compile every Triton kernel variant for sm_90 without a GPU: catches compiler errors the
interpreter misses and reports registers/spills."""
import os, sys, itertools
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from speed_kernels.ops import noise as N, loss as L

target = GPUTarget("cuda", 90, 32)
FAILURES = []
DIV = [["tt.divisibility", 16]]

def compile_(fn, sig, consts, warps, label):
    if os.environ.get("ONLY") and not all(w in label for w in os.environ["ONLY"].split(",")):
        return
    names = fn.arg_names
    signature = {k: sig.get(k, "constexpr") for k in names}
    for k in consts: signature[k] = "constexpr"
    attrs = {(names.index(k),): DIV for k, v in sig.items() if v.startswith("*")}
    attrs.update({(names.index(k),): DIV for k in ("n",) if k in sig})
    src = ASTSource(fn, signature, constexprs=consts, attrs=attrs)
    try:
        k = triton.compile(src, target=target, options={"num_warps": warps})
        md = k.metadata
        ptx = k.asm["ptx"]
        v4 = ptx.count("ld.global.v4") + ptx.count("ld.global.nc.v4")
        v2 = ptx.count("ld.global.v2") + ptx.count("ld.global.nc.v2")
        import subprocess, tempfile, re
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
        r = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", "/dev/null"], capture_output=True, text=True)
        info = " ".join(re.findall(r"Used \d+ registers|\d+ bytes spill stores", r.stderr))
        st4 = ptx.count("st.global.v4"); st2 = ptx.count("st.global.v2")
        print(f"OK   {label:52s} {info} shared={md.shared} ld.v4={v4} ld.v2={v2} st.v4={st4} st.v2={st2}")
        return k
    except Exception as e:
        FAILURES.append(label)
        print(f"FAIL {label}: {type(e).__name__}: {str(e)[:2000]}")

which = sys.argv[1] if len(sys.argv) > 1 else "all"
# DTYPES=bf16 (say) limits the element types, for a quicker check (CI). "bf16-fp32": the loss
# kernel with a bf16 pred (and gradient) and fp32 x0, as bf16 autocast feeds it.
for dt_spec in os.environ.get("DTYPES", "fp32,bf16,bf16-fp32").split(","):
    dt, xdt = dt_spec.split("-") if "-" in dt_spec else (dt_spec, dt_spec)
    if which in ("all", "noise") and xdt == dt:
        for has_t, mirror, even in [(False, False, True), (False, True, False), (True, False, True), (False, False, False)]:
            sig = dict(x0_ptr=f"*{dt}", xt_ptr=f"*{dt}", t_out_ptr="*i64", t_in_ptr="*i64", tab_ptr="*fp32",
                       call_ptr="*i64", k0="i32", k1="i32", pivot="i32", n_draw="i32",
                       n="i32", n_chunks="i32", T="i32")
            compile_(N._noise_kernel, sig, dict(HAS_T=has_t, MIRROR=mirror, NITER=10, BLOCK=4096, EVEN=even), 8,
                     f"noise {dt} has_t={has_t} mirror={mirror} even={even}")
    if which in ("all", "loss"):
        for target_, ls, mode in itertools.product((0, 1, 2), (False, True), ("fwd", "fwd-nograd", "bwd")):
            sig = dict(pred_ptr=f"*{dt}", x0_ptr=f"*{xdt}", t_ptr="*i64", tab_ptr="*fp32", call_ptr="*i64", k0="i32", k1="i32",
                       grad_ptr=f"*{dt}", part_ptr="*fp32", gscale_ptr="*fp32", inv_batch="fp32",
                       n="i32", n_chunks="i32", T="i32", n_parts="i32")
            c = dict(TARGET=target_, LEARN_SIGMA=ls, CALL_OFFSET=1 if mode != "bwd" else 0,
                     COMPUTE_LOSS=mode != "bwd", WRITE_GRAD=mode in ("fwd", "bwd"), PER_SAMPLE_SCALE=mode == "bwd",
                     BLOCK=int(os.environ.get("LB", 4096)),
                     EVEN=mode in ("fwd", "bwd"))  # and the masked variant for the other one
            compile_(L._loss_kernel, sig, c, 8 if c["BLOCK"] >= 4096 else 4, f"loss {dt_spec} target={target_} ls={ls} {mode} even={c['EVEN']}")
if which in ("all", "misc"):
    sig = dict(part_ptr="*fp32", t_ptr="*i64", tab_ptr="*fp32", loss_ptr="*fp32", terms_ptr="*fp32", scale_ptr="*fp32",
               call_ptr="*i64", call_used_ptr="*i64", B="i32", n_chunks="i32", n_parts="i32", n="i32", T="i32")
    for rm in (True, False):
        compile_(L._finalize_kernel, sig, dict(CALL_OFFSET=1, LEARN_SIGMA=True, REDUCE_MEAN=rm, BLOCK_B=4, BLOCK_C=128), 4, f"finalize rm={rm}")
    for dt in ("fp32", "bf16"):
        compile_(L._scale_grad_kernel, dict(grad_ptr=f"*{dt}", state_ptr="*fp32", g_ptr="*fp32", N="i64"), dict(PARITY=0, BLOCK=4096), 8, f"scale {dt}")

print(f"{len(FAILURES)} variant(s) failed: {FAILURES}" if FAILURES else "all kernel variants compile for sm_90")
sys.exit(1 if FAILURES else 0)
