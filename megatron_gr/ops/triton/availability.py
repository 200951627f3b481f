"""Whether the Triton kernels can run here: a missing backend is an error, never a silent
fallback to the reference."""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``),
    which the kernel tests use on machines without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    """Looked up once: every op dispatch asks, and a package search costs ~30 us."""
    return importlib.util.find_spec("triton") is not None


def triton_missing_reason(device: torch.device) -> Optional[str]:
    """Why Triton kernels cannot run on ``device`` (None when they can)."""
    if not _triton_installed():
        return "needs the triton package, which is not installed (pip install 'megatron_gr[gpu]')"
    if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
        return None
    return f"runs on CUDA devices only (or on the CPU in Triton's interpreter, TRITON_INTERPRET=1), not on {device}"
