"""FP8 cast with a scale: validates once, then dispatches to the reference or the fused
Triton kernel (one pass: scale, saturate, round, both layouts, amax)."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_gr.ops.backend import KernelBackend, check_backend, require_backend
from megatron_gr.ops.pytorch.fp8_cast import pytorch_fp8_cast

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_cast(
    x: torch.Tensor,
    scale: torch.Tensor,
    *,
    dtype: torch.dtype,
    scale_axis: Optional[int] = None,
    out: bool = True,
    transposed: bool = False,
    pad_to: int = 1,
    amax: Optional[torch.Tensor] = None,
    kernel: KernelBackend = KernelBackend.PYTORCH,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``x * scale`` in FP8: saturated to ``±finfo(dtype).max``, rounded to nearest (ties to
    even).

    Args:
        x: ``[M, N]`` floating tensor, any strides.
        scale: float32, one element (``scale_axis=None``), ``M`` (one per row,
            ``scale_axis=0``) or ``N`` (one per column, ``scale_axis=1``).
        dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        out: return the row-major ``[M, N]`` result.
        transposed: also return its transpose ``[N, M_pad]``, row-major, with ``M_pad`` the
            next multiple of ``pad_to`` and zeros in the padding columns.
        amax: float32 one-element tensor updated in place to ``max(amax, max |x|)``; a NaN
            in ``x`` counts as inf.
        kernel: ``pytorch`` or ``triton``.

    Returns:
        ``(data, data_t)``, each None when not asked for.
    """
    _validate(x, scale, dtype=dtype, scale_axis=scale_axis, pad_to=pad_to, amax=amax, kernel=kernel)
    if kernel == "triton":
        require_backend(kernel, x.device, what="FP8 cast")
        from megatron_gr.ops.triton.fp8_cast import triton_fp8_cast

        cast = triton_fp8_cast
    else:
        cast = pytorch_fp8_cast
    return cast(x, scale, dtype=dtype, scale_axis=scale_axis, out=out, transposed=transposed, pad_to=pad_to, amax=amax)


def _validate(x, scale, *, dtype, scale_axis, pad_to, amax, kernel) -> None:
    """Python attribute tests only: no tensor op (under a microsecond per cast)."""
    if kernel not in ("pytorch", "triton"):
        check_backend(kernel)  # raises, naming the choices
    if dtype not in FP8_DTYPES:
        raise ValueError(f"dtype={dtype}: choose one of {FP8_DTYPES}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a 2-d floating tensor, got {tuple(x.shape)} {x.dtype}")
    if scale_axis not in (None, 0, 1):
        raise ValueError(f"scale_axis={scale_axis!r}: choose None, 0 or 1")
    expected = 1 if scale_axis is None else x.shape[scale_axis]
    if scale.dtype != torch.float32 or scale.numel() != expected or not scale.is_contiguous():
        raise ValueError(
            f"scale must be a contiguous float32 tensor of {expected} elements for scale_axis="
            f"{scale_axis}, got {tuple(scale.shape)} {scale.dtype}"
        )
    if pad_to < 1:
        raise ValueError(f"pad_to={pad_to} must be >= 1")
    if amax is not None and (amax.dtype != torch.float32 or amax.numel() != 1):
        raise ValueError(f"amax must be a one-element float32 tensor, got {tuple(amax.shape)} {amax.dtype}")
