"""Scales and quantised GEMM operands: amaxes (reduced over a process group), scales from
amaxes, the amax history of delayed scaling, and the three ways an operand is cast.

Every operand is kept as ``[rows, contraction]`` row-major FP8 with the factor that turns
it back, ``data * scale_inv`` ~ the original: one factor (per tensor) or one per row
(``[rows, 1]``). ``torch._scaled_mm`` multiplies two such operands (see ``linear.py``).

Overflow handling (every recipe): an amax that is inf or NaN (the tensor holds an inf or a
NaN) gives a NaN ``scale_inv``, so the GEMM's output is NaN where the tensor's values were
used: the overflow propagates as it would without FP8, and megatron skips the step or the
loss shows it. It never enters an amax history and never changes a delayed scale. Finite
values beyond the scaled range (a tensor that grew since its delayed scale was set)
saturate at the format's largest value.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_gr.ops.fp8_cast import fp8_cast
from megatron_gr.ops.pytorch.fp8_cast import abs_max_nan_as_inf

# amaxes below this give the scale of this amax: finite scales for all-zero tensors
MIN_AMAX = 1e-12


@dataclass
class Fp8Operand:
    """``data`` ``[rows, cols]`` FP8, row-major; ``scale_inv`` float32, one element or
    ``[rows, 1]``."""

    data: torch.Tensor
    scale_inv: torch.Tensor


@functools.lru_cache(maxsize=None)
def fp8_max(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def all_reduce_max_(amax: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Max over ``group`` in place (nothing to do without a group or alone in it). A NaN
    has been turned into inf already, so the max keeps it non-finite."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax


def _no_grad_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` for a reduction that must not enter autograd (detached only where it could)."""
    return x.detach() if x.requires_grad and torch.is_grad_enabled() else x


def amax_along(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``max |x|`` over ``dim`` of a 2-d ``x``, float32, ``dim`` kept (``[M, 1]`` or
    ``[1, N]``: the shape the per-row or per-column scale is used in); zeros when ``dim`` is
    empty; NaN gives inf."""
    if x.shape[dim] == 0:
        shape = (x.shape[0], 1) if dim == 1 else (1, x.shape[1])
        return torch.zeros(shape, dtype=torch.float32, device=x.device)
    magnitude = torch.linalg.vector_norm(_no_grad_view(x), ord=float("inf"), dim=dim, keepdim=True,
                                         dtype=torch.float32)
    return magnitude.nan_to_num_(nan=float("inf"), posinf=float("inf"))


def amax_of_rows(x: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """``max |x|`` (``[1]`` float32, NaN as inf) over the rows of ``x`` ``[M, N]`` where
    ``rows`` ``[M, 1]`` (bool) is set; all rows when it is None."""
    if rows is None:
        return abs_max_nan_as_inf(x).reshape(1)
    return torch.where(rows, amax_along(x, dim=1), 0.0).amax().reshape(1)


def scale_from_amax(amax: torch.Tensor, *, dtype: torch.dtype, margin: int) -> torch.Tensor:
    """``fp8_max / amax / 2**margin`` (float32): the largest magnitude lands ``margin``
    binades below the format's largest value.

    Computed as ``(1 / amax) * (fp8_max / 2**margin)``, the rounding of ``float / tensor``
    in torch (two roundings, not one division): scales stay bitwise what they were."""
    amax = amax if amax.dtype == torch.float32 else amax.float()
    return amax.clamp(min=MIN_AMAX).reciprocal_().mul_(fp8_max(dtype) / 2.0**margin)


def scale_inv_of(scale: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """The dequantisation factor ``1 / scale``; NaN where ``amax`` (a magnitude: >= 0, inf
    or NaN) is not finite. ``amax < inf`` is that test in one op (``isfinite`` is four)."""
    return torch.where(amax < float("inf"), scale.reciprocal(), float("nan"))


class AmaxHistory:
    """Delayed scaling of one tensor: each quantisation uses the scale set by the amaxes of
    the earlier ones.

    The history holds ``length`` amaxes, newest first, one per quantisation (per micro-batch
    for activations, per backward pass for gradients). Recording an amax rolls the history
    and sets the scale from its maximum (``compute_algo='max'``) or its newest entry
    (``'most_recent'``), with the margin. Rules that keep it sane:

    - The first quantisation has no history: it is scaled by its own amax (current
      scaling), and its amax becomes the first entry. Which one it is, is decided on the
      device (``records``, the amaxes recorded so far), so a CUDA graph captured before
      training replays the first step as the eager step runs it.
    - A non-finite amax is not recorded: the history does not roll and the scale stays.
    - A history whose reference amax is 0 (all-zero tensors) keeps the previous scale
      (1.0 if there never was a positive amax).

    State lives on the tensor's device and is updated in place with tensor ops only: no
    host sync, and a replayed graph that captured an update writes the tensors the eager
    calls read. Eager casts after the first may skip the device-side test (``_host_saw_record``:
    the scale is then the history's for sure); ``graph_capture`` (set around CUDA-graph
    captures, ``graph_capture.py``) keeps every decision on the device.
    """

    def __init__(self, *, length: int, compute_algo: str, dtype: torch.dtype, margin: int):
        if length < 1:
            raise ValueError(f"amax history length must be >= 1, got {length}")
        if compute_algo not in ("max", "most_recent"):
            raise ValueError(f"compute_algo={compute_algo!r}: choose 'max' or 'most_recent'")
        self.length, self.compute_algo, self.dtype, self.margin = length, compute_algo, dtype, margin
        self.history: Optional[torch.Tensor] = None  # [length] float32, newest first
        self.scale: Optional[torch.Tensor] = None  # [1] float32
        self.records: Optional[torch.Tensor] = None  # [1] int64: amaxes recorded (non-finite ones too)
        self.graph_capture = False
        self._host_saw_record = False
        self._amax: Optional[torch.Tensor] = None  # the cast's amax, reused every call

    def allocate(self, device: torch.device) -> None:
        """The state tensors on ``device`` (once: later updates are in place)."""
        if self.history is None:
            self.history = torch.zeros(self.length, dtype=torch.float32, device=device)
            self.scale = torch.ones(1, dtype=torch.float32, device=device)
            self.records = torch.zeros(1, dtype=torch.int64, device=device)

    @property
    def scale_is_known(self) -> bool:
        """Whether the host knows an amax was recorded (eager calls only): the next cast then
        takes :attr:`scale` without the device-side test of :meth:`scale_or`."""
        return self._host_saw_record and not self.graph_capture

    def scale_or(self, own_scale: torch.Tensor) -> torch.Tensor:
        """The scale of the next quantisation: the history's once it recorded an amax, else
        ``own_scale`` (the tensor's own, current scaling), chosen on the device."""
        self.allocate(own_scale.device)
        return torch.where(self.records > 0, self.scale, own_scale)

    def amax_buffer(self, device: torch.device) -> torch.Tensor:
        """A zeroed ``[1]`` float32 amax for the next cast to fill (one buffer per history:
        no allocation per call)."""
        if self._amax is None or self._amax.device != device:
            self._amax = torch.zeros(1, dtype=torch.float32, device=device)
            return self._amax
        return self._amax.zero_()

    def record(self, amax: torch.Tensor) -> None:
        if amax.dtype != torch.float32 or amax.shape != (1,):
            amax = amax.reshape(1).float()
        self.allocate(amax.device)
        finite = amax.abs() < float("inf")  # isfinite in two ops (isfinite itself is four)
        rolled = amax if self.length == 1 else torch.cat([amax, self.history[:-1]])
        torch.where(finite, rolled, self.history, out=self.history)
        reference = self.history.amax(dim=0, keepdim=True) if self.compute_algo == "max" else self.history[:1]
        updated = scale_from_amax(reference, dtype=self.dtype, margin=self.margin)
        torch.where(finite & (reference > 0), updated, self.scale, out=self.scale)
        self.records.add_(1)
        self._host_saw_record = self._host_saw_record or not self.graph_capture

    def snapshot(self) -> tuple:
        """Copies of the state (allocated first: a capture must find it outside its pool)."""
        return self.history.clone(), self.scale.clone(), self.records.clone(), self._host_saw_record

    def restore(self, snapshot: tuple) -> None:
        """The state of ``snapshot``, written in place (the tensors graphs captured stay)."""
        history, scale, records, self._host_saw_record = snapshot
        self.history.copy_(history)
        self.scale.copy_(scale)
        self.records.copy_(records)


def quantize_per_tensor(
    x: torch.Tensor,
    *,
    dtype: torch.dtype,
    margin: int,
    group: Optional[dist.ProcessGroup],
    kernel: str,
    history: Optional[AmaxHistory] = None,
    out: bool = True,
    transposed: bool = False,
    pad_to: int = 1,
    rows: Optional[torch.Tensor] = None,
) -> tuple[Optional[Fp8Operand], Optional[Fp8Operand]]:
    """``x`` ``[M, N]`` with one scale: from its own amax (reduced over ``group``), or from
    ``history`` once it has one. Eagerly after a recorded amax, the amax is taken in the
    same pass as the cast; otherwise (the first quantisation, or a graph capture) it is
    taken first and the scale is chosen on the device (:meth:`AmaxHistory.scale_or`).
    The amax is then recorded. ``rows`` (``[M, 1]`` bool): only those rows enter the
    amax (a graph's padded batch: the real tokens'). Returns the row-major operand and/or
    the transposed one (``[N, M_pad]``), sharing the scale."""
    if history is not None and history.scale_is_known and rows is None:
        scale = history.scale
        amax = history.amax_buffer(x.device)
        data, data_t = fp8_cast(x, scale, dtype=dtype, out=out, transposed=transposed, pad_to=pad_to, amax=amax,
                                kernel=kernel)
        all_reduce_max_(amax, group)
    else:
        amax = all_reduce_max_(amax_of_rows(x, rows), group)
        scale = scale_from_amax(amax, dtype=dtype, margin=margin)
        if history is not None:
            scale = history.scale_or(scale)
        data, data_t = fp8_cast(x, scale, dtype=dtype, out=out, transposed=transposed, pad_to=pad_to, kernel=kernel)
    scale_inv = scale_inv_of(scale, amax)  # before the record: it updates the history's scale in place
    if history is not None:
        history.record(amax)
    return (
        Fp8Operand(data, scale_inv) if out else None,
        Fp8Operand(data_t, scale_inv) if transposed else None,
    )


def quantize_per_row(
    x: torch.Tensor, *, dtype: torch.dtype, margin: int, group: Optional[dist.ProcessGroup], kernel: str
) -> Fp8Operand:
    """``x`` ``[M, N]`` with one scale per row (the row's amax, reduced over ``group`` when
    its columns are split over the group's ranks)."""
    if x.shape[0] == 0:  # no rows (``where`` would give their [0, 1] scales a stride _scaled_mm rejects)
        return Fp8Operand(torch.empty(x.shape, dtype=dtype, device=x.device),
                          torch.empty(0, 1, dtype=torch.float32, device=x.device))
    amax = all_reduce_max_(amax_along(x, dim=1), group)
    scale = scale_from_amax(amax, dtype=dtype, margin=margin)
    data, _ = fp8_cast(x, scale, dtype=dtype, scale_axis=0, kernel=kernel)
    return Fp8Operand(data, scale_inv_of(scale, amax))  # [M, 1] already


def quantize_per_column_transposed(
    x: torch.Tensor,
    *,
    dtype: torch.dtype,
    margin: int,
    group: Optional[dist.ProcessGroup],
    kernel: str,
    pad_to: int = 1,
    rows: Optional[torch.Tensor] = None,
) -> Fp8Operand:
    """The transpose of ``x`` ``[M, N]``, ``[N, M_pad]``, with one scale per row of the
    result (per column of ``x``, its amax reduced over ``group``; ``rows`` ``[M, 1]``
    bool: over those rows only); padding columns are zero."""
    amax = all_reduce_max_(amax_along(x if rows is None else torch.where(rows, _no_grad_view(x), 0.0), dim=0), group)
    scale = scale_from_amax(amax, dtype=dtype, margin=margin)
    _, data_t = fp8_cast(x, scale, dtype=dtype, scale_axis=1, out=False, transposed=True, pad_to=pad_to, kernel=kernel)
    return Fp8Operand(data_t, scale_inv_of(scale, amax).reshape(-1, 1))
