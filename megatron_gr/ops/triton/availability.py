"""Whether the Triton kernels can run here: a missing backend is an error, never a silent
fallback to the reference."""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``),
    which the kernel tests use on machines without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def require_triton(device: torch.device, *, what: str) -> None:
    """Raises ``RuntimeError`` naming ``what`` and the fix unless Triton can run kernels on
    ``device``."""
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError(
            f"{what} needs the triton package, which is not installed: install it "
            "(pip install 'megatron_gr[gpu]') or choose the pytorch kernel"
        )
    if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
        return
    raise RuntimeError(
        f"{what} runs on CUDA devices only, got tensors on {device}: choose the pytorch kernel "
        "(model.attention_kernel=pytorch) for CPU runs"
    )
