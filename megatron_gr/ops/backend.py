"""Which implementation an op runs: the one kernel-backend setting of the project.

Every op dispatcher (``ops/<op>.py``) takes a :class:`KernelBackend` and runs either the
PyTorch reference (any device) or the Triton kernel (CUDA; the CPU only under Triton's
interpreter, for tests). A run resolves the user's ``training.kernel_backend`` (``auto``,
``pytorch`` or ``triton``) once, against its device and the installed packages
(``megatron_gr.training.plan``); layers and tables receive the resolved value when they are
built. A missing backend is an error, never a silent fallback to the reference.
"""

from __future__ import annotations

import enum

import torch

from megatron_gr.ops.triton.availability import triton_missing_reason


class KernelBackend(str, enum.Enum):
    PYTORCH = "pytorch"
    TRITON = "triton"

    def __str__(self) -> str:
        return self.value


BACKEND_SETTINGS = ("auto", "pytorch", "triton")


def check_backend(kernel) -> KernelBackend:
    """``kernel`` as a :class:`KernelBackend` (its string value is accepted too)."""
    try:
        return KernelBackend(kernel)
    except ValueError:
        choices = ", ".join(repr(b.value) for b in KernelBackend)
        raise ValueError(f"kernel={kernel!r}: choose one of {choices}") from None


def require_backend(kernel, device: torch.device, *, what: str) -> KernelBackend:
    """``check_backend``, and for Triton a ``RuntimeError`` naming ``what`` unless its kernels
    can run on ``device``."""
    backend = check_backend(kernel)
    if backend is KernelBackend.TRITON:
        reason = triton_missing_reason(device)
        if reason is not None:
            raise RuntimeError(f"kernel='triton' ({what}) {reason}: use the pytorch backend (--kernel-backend pytorch)")
    return backend


def resolve_backend(setting: str, device: torch.device) -> KernelBackend:
    """The backend a run uses: ``auto`` picks Triton where its kernels can run on a GPU and
    the PyTorch reference elsewhere (the interpreter is for tests, never chosen by ``auto``).
    Raises ``ValueError`` (one line, naming the setting and the fix) for ``triton`` where it
    cannot run."""
    if setting == "auto":
        usable = device.type == "cuda" and triton_missing_reason(device) is None
        return KernelBackend.TRITON if usable else KernelBackend.PYTORCH
    backend = check_backend(setting)
    if backend is KernelBackend.TRITON:
        reason = triton_missing_reason(device)
        if reason is not None:
            raise ValueError(f"training.kernel_backend='triton': the Triton kernels {reason}; use --kernel-backend pytorch or auto")
    return backend
