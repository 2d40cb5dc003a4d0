"""Skip-or-fail for the components the README promises (triton, its backend, ptxas, the compiled
extension). With SPEED_KERNELS_REQUIRE_ALL=1 (set by .ci/run) a missing component FAILS the test
instead of skipping it, so CI cannot stay green with a whole backend silently untested."""
import importlib
import os

import pytest

REQUIRE_ALL = os.environ.get("SPEED_KERNELS_REQUIRE_ALL") == "1"


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
