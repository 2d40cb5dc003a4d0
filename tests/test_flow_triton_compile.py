"""The flow Triton kernels compile for Hopper (sm_90) without a GPU (benchmarks/aot_compile_flow.py in
a subprocess, outside the interpreter that conftest switches on)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_flow_triton_kernels_compile_for_sm90():
    env = dict(os.environ, DTYPES="bf16", PYTHONPATH=f"{ROOT}:{ROOT / 'python'}")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "aot_compile_flow.py")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all flow kernel variants compile" in proc.stdout
