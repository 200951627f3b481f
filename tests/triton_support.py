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


def cache_interpreter_builtin_names() -> None:
    """Speeds up the Triton 3.6 interpreter without changing what it runs: every kernel
    launch and every call of a ``@triton.jit`` helper inside a kernel re-patches the
    language's builtins, finding them with ``inspect.getmembers`` over ``triton.language``,
    its ``core``, ``math`` and ``tensor`` (~2 ms a call; the mHC and attention tests make
    ~10^4 such calls, a third of their time). Which of their names hold builtins never
    changes, so the names are listed once, here, before any kernel runs; each call still
    patches exactly those of the members that are builtins then, in the same order, as the
    original does. Other Triton versions keep the original."""
    try:
        import triton
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    if not triton.__version__.startswith("3.6.") or not hasattr(interpreter, "_patch_attr"):
        return
    import inspect

    original = interpreter._patch_builtin
    names = {id(pkg): [name for name, member in inspect.getmembers(pkg) if tl.core.is_builtin(member)]
             for pkg in (tl, tl.tensor, tl.math, tl.core, tl.core.tensor_descriptor_base)}

    def _patch_builtin(pkg, builder, scope):
        if id(pkg) not in names:
            return original(pkg, builder, scope)
        for name in names[id(pkg)]:
            member = getattr(pkg, name)
            if tl.core.is_builtin(member):
                interpreter._patch_attr(pkg, name, member, builder, scope)

    interpreter._patch_builtin = _patch_builtin
