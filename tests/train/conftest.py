"""Make `speed_train` (python/speed_train, mapped by setup.py's package_dir) importable when the
package is not pip-installed, for this process and for the subprocesses tests start."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (str(ROOT), str(ROOT / "python")):
    if p not in sys.path:
        sys.path.insert(0, p)
    parts = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if p not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([p] + [x for x in parts if x])
