"""Shared set-up of the Triton kernel tests: on a machine without a GPU the kernels run in
the Triton interpreter, which must be switched on before triton is first imported (it
decides when a function is defined, triton's own library included)."""

from __future__ import annotations

import os
import sys

import pytest
import torch


def triton_or_skip() -> str:
    """Call at the top of a test module, before importing any kernel. Returns the device the
    kernels run on (``cuda``, or ``cpu`` under the interpreter); skips the module when
    neither can run."""
    if not torch.cuda.is_available():
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)
        os.environ["TRITON_INTERPRET"] = "1"
        import numpy

        if tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 3):
            pytest.skip("the Triton 3.6 interpreter needs numpy < 2.3", allow_module_level=True)
    pytest.importorskip("triton")
    return "cuda" if torch.cuda.is_available() else "cpu"
