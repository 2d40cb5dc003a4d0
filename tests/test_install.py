"""The install path a newcomer takes: declared dependencies, a loud failure instead of a silent
extension-less install, and a non-editable install that carries the compiled extension.

(.ci/run itself installs exactly as the README says, with the venv's bundled pip, and runs the suite
with SPEED_KERNELS_REQUIRE_EXT=1, where tests/test_cpp_ext.py fails if `cpp` is not available.)"""
import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
DIST_OF = {"sklearn": "scikit-learn", "PIL": "pillow"}
STDLIB = set(sys.stdlib_module_names)
OWN = {"speed_kernels", "speed_train"}


def _setup_requirements():
    """(install_requires, extras) as setup.py declares them, read without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            kw = {k.arg: k.value for k in node.keywords}
            return ast.literal_eval(kw["install_requires"]), ast.literal_eval(kw["extras_require"])
    raise AssertionError("setup() call not found in setup.py")


def _dist_name(req: str) -> str:
    for sep in "<>=!~[; ":
        req = req.split(sep)[0]
    return req.strip().lower()


def _third_party_imports():
    found = {}
    for pkg in (ROOT / "speed_kernels", ROOT / "python" / "speed_train"):
        for path in pkg.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top not in STDLIB and top not in OWN:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_runtime_import_is_declared():
    install, extras = _setup_requirements()
    declared = {_dist_name(r) for r in install}
    optional = {_dist_name(r) for reqs in extras.values() for r in reqs}
    imports = _third_party_imports()
    assert "torch" in imports and "numpy" in imports  # the scan sees the package
    missing = {}
    for mod, where in imports.items():
        dist = DIST_OF.get(mod, mod).lower()
        if dist not in declared and dist not in optional:
            missing[mod] = sorted(where)
    assert not missing, f"imported but not declared in setup.py install_requires/extras: {missing}"


def test_setup_without_torch_stops_with_instructions():
    """An isolated build (no torch) must fail and say how to install, not install without _C."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name'];"
        "import runpy; runpy.run_path('setup.py', run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k != "SPEED_KERNELS_NO_EXT"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "--no-build-isolation" in out and "SPEED_KERNELS_NO_EXT=1" in out, out


def test_setup_no_ext_is_an_explicit_choice():
    code = (
        "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name'];"
        "import runpy; runpy.run_path('setup.py', run_name='__main__')"
    )
    env = dict(os.environ, SPEED_KERNELS_NO_EXT="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "without the compiled extension" in proc.stderr


@pytest.mark.slow
def test_non_editable_wheel_carries_the_extension(tmp_path):
    """`pip install --no-build-isolation .` path: the wheel holds speed_kernels._C, and the package
    imported from it (not from the source tree) reports the cpp backend available."""
    pytest.importorskip("torch")
    env = dict(os.environ, MAX_JOBS="2", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("SPEED_KERNELS_NO_EXT", None)
    env["SPEED_KERNELS_CUDA"] = "0"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("speed_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("speed_kernels/_C") and n.endswith((".so", ".pyd")) for n in names), names
    assert any(n.startswith("speed_train/") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    check = (
        "import speed_kernels, json; assert speed_kernels.__file__.startswith(%r), speed_kernels.__file__;"
        "print(json.dumps(speed_kernels.backends()))" % str(site)
    )
    run_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    run_env["PYTHONPATH"] = str(site)
    out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, env=run_env)
    assert out.returncode == 0, out.stderr
    assert '"cpp": "available"' in out.stdout, out.stdout
