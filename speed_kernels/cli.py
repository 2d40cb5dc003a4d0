"""The library's own command line: ``python -m speed_kernels.cli analyze ...`` (analyze only).

The ``speed-kernels`` console command (analyze, train, sample, compare) is
``speed_train.cli:main``: it sits in the application package because it drives both. The library
never imports speed_train."""
from __future__ import annotations

import sys

from speed_kernels.analysis import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
