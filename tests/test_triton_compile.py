"""The Triton kernels compile for Hopper (sm_90) on a machine without a GPU.

Runs benchmarks/aot_compile_check.py (bf16 variants, and bf16 pred with fp32 x0) in a subprocess without TRITON_INTERPRET (conftest sets it for
the interpreter tests, and the compiler needs real JIT functions)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from required import missing, require_module

require_module("triton")
nvidia = require_module("triton.backends.nvidia")

ROOT = Path(__file__).resolve().parents[1]


def test_all_triton_kernels_compile_for_sm90():
    if not (Path(nvidia.__file__).parent / "bin" / "ptxas").exists():
        missing("ptxas", "Triton's wheel ships no ptxas here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DTYPES"] = "bf16,bf16-fp32"  # and the mixed pred/x0 of bf16 autocast
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "aot_compile_check.py")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "all kernel variants compile" in proc.stdout
