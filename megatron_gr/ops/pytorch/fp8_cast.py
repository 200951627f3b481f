"""Reference FP8 cast: ``x * scale``, saturated to the format's range, rounded to the nearest
FP8 value (ties to even), optionally also written transposed with zero-padded columns (the
layout ``torch._scaled_mm`` needs for a weight-gradient operand), optionally accumulating
``max |x|`` on the way."""

from __future__ import annotations

from typing import Optional

import torch

_LIMITS = {dtype: torch.finfo(dtype).max for dtype in (torch.float8_e4m3fn, torch.float8_e5m2)}


def fp8_scale_view(scale: torch.Tensor, scale_axis: Optional[int]) -> torch.Tensor:
    """``scale`` shaped to broadcast over ``[M, N]``: one element ``[1]``, a column ``[M, 1]``
    (one scale per row, ``scale_axis=0``) or a row ``[1, N]`` (one per column,
    ``scale_axis=1``)."""
    if scale_axis is None:
        return scale if scale.dim() == 1 else scale.reshape(1)
    if scale.dim() == 2 and scale.shape[1 - scale_axis] == 1:  # already a column or a row
        return scale
    return scale.reshape(-1, 1) if scale_axis == 0 else scale.reshape(1, -1)


def abs_max_nan_as_inf(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` in float32 (0 for an empty ``x``) in one pass over ``x``; a NaN
    anywhere gives inf, so that a poisoned tensor always has a non-finite amax."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    source = x.detach() if x.requires_grad and torch.is_grad_enabled() else x
    magnitude = torch.linalg.vector_norm(source, ord=float("inf"), dtype=torch.float32)  # NaN propagates
    return magnitude.nan_to_num_(nan=float("inf"), posinf=float("inf"))


def pytorch_fp8_cast(
    x: torch.Tensor,
    scale: torch.Tensor,
    *,
    dtype: torch.dtype,
    scale_axis: Optional[int],
    out: bool,
    transposed: bool,
    pad_to: int,
    amax: Optional[torch.Tensor],
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    limit = _LIMITS[dtype]
    wide = x if x.dtype == torch.float32 else x.float()
    scaled = (wide * fp8_scale_view(scale, scale_axis)).clamp_(-limit, limit)
    if amax is not None:
        torch.maximum(amax, abs_max_nan_as_inf(x), out=amax)
    data = scaled.to(dtype) if out else None
    data_t = None
    if transposed:
        rows, cols = x.shape
        padded = -(-rows // pad_to) * pad_to
        data_t = torch.empty(cols, padded, dtype=dtype, device=x.device)
        data_t.narrow(1, 0, rows).copy_(scaled.t())
        if padded > rows:
            data_t.narrow(1, rows, padded - rows).zero_()
    return data, data_t
