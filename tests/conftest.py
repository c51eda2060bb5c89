"""Shared pytest set-up.

Tests marked ``gpu`` need CUDA and are skipped cleanly without it; everything else runs
on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set here before
Triton is imported so a plain ``pytest`` run works too).
"""
import os

import pytest

if not os.environ.get("TRITON_INTERPRET"):
    try:
        import torch as _torch

        _has_cuda = _torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is a hard error later anyway
        _has_cuda = False
    if not _has_cuda:
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from triton_moe.backends import triton_interpreter_enabled  # noqa: E402

HAS_CUDA = torch.cuda.is_available() and not triton_interpreter_enabled()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU and TRITON_INTERPRET unset")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    """Device for interpreter-tier tests: CPU under the interpreter, else CUDA."""
    return "cuda" if HAS_CUDA else "cpu"
