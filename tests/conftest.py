"""Test set-up. Without a GPU the Triton kernels run through the interpreter, which must be
switched on before any kernel module is imported."""
import os
import sys

# tests/required.py (skip-or-fail helpers) importable from every test module, tests/train too
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
