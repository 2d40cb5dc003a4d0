"""The Triton kernels compile for Hopper (sm_90) on a machine without a GPU.

Runs benchmarks/aot_compile_check.py (bf16 variants) in a subprocess without TRITON_INTERPRET (conftest sets it for
the interpreter tests, and the compiler needs real JIT functions)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
nvidia = pytest.importorskip("triton.backends.nvidia")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    not (Path(nvidia.__file__).parent / "bin" / "ptxas").exists(), reason="Triton's wheel ships no ptxas here"
)
def test_all_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DTYPES"] = "bf16"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "aot_compile_check.py")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "all kernel variants compile" in proc.stdout
