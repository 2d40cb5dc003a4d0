"""Skip-or-fail for the components the README promises (triton, its backend, ptxas, the compiled
extension) and for the test-only packages of requirements-dev.txt (diffusers). With
SPEED_KERNELS_REQUIRE_ALL=1 (set by .ci/run) a missing component FAILS the test instead of skipping
it, so CI cannot stay green with a whole backend, or the real-package tests, silently untested."""
import importlib
import importlib.metadata
import os
import warnings
from pathlib import Path

import pytest

REQUIRE_ALL = os.environ.get("SPEED_KERNELS_REQUIRE_ALL") == "1"
DEV_REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements-dev.txt"


def missing(what: str, why: str):
    """Skip (or, under SPEED_KERNELS_REQUIRE_ALL=1, fail) because `what` is missing."""
    if REQUIRE_ALL:
        pytest.fail(f"SPEED_KERNELS_REQUIRE_ALL=1 but {what} is missing: {why}", pytrace=False)
    pytest.skip(f"{what} missing: {why}", allow_module_level=True)


def require_module(name: str):
    """importorskip that fails under SPEED_KERNELS_REQUIRE_ALL=1 (usable at module level)."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a backend module that fails while loading
        missing(f"module {name}", f"{type(exc).__name__}: {exc}")


def dev_pin(dist: str, path: Path = DEV_REQUIREMENTS) -> str:
    """The version requirements-dev.txt pins for `dist` (a `dist==version` line)."""
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        name, sep, version = line.partition("==")
        if sep and name.strip().lower() == dist.lower():
            return version.strip()
    raise LookupError(f"{path.name} pins no version of {dist} (expected a line '{dist}==X.Y.Z')")


def require_pinned(name: str, dist: str | None = None):
    """require_module for a test-only package pinned in requirements-dev.txt (usable at module level).

    Missing: skipped, or failed under SPEED_KERNELS_REQUIRE_ALL=1 (as require_module). Installed at a
    version other than the pin: failed under SPEED_KERNELS_REQUIRE_ALL=1 (CI must test the version
    written down); locally the tests run with a warning, which is how a new release is tried out
    before the pin is bumped."""
    dist = dist or name
    pin = dev_pin(dist)
    mod = require_module(name)
    try:
        have = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        have = getattr(mod, "__version__", "unknown")
    if have != pin:
        why = f"{dist} {have} is installed, {DEV_REQUIREMENTS.name} pins {dist}=={pin}"
        if REQUIRE_ALL:
            pytest.fail(f"SPEED_KERNELS_REQUIRE_ALL=1 but {why}", pytrace=False)
        warnings.warn(f"{why}: testing the installed one", stacklevel=2)
    return mod
