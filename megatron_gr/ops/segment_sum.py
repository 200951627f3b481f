"""Rows grouped by equal keys: the grouping (one stable sort), the gather of each input's
group row and its backward, the per-group gradient sum in a fixed order.

- :func:`sorted_groups`: equal keys grouped by a stable sort, any device, one host read
  (the number of groups).
- :func:`gather_rows`: ``rows[index]``.
- :func:`segment_sum`: per group, the sum of its rows in the order
  :mod:`megatron_gr.ops.pytorch.segment_sum` fixes (bit-identical on every backend).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_gr.ops.pytorch.segment_sum import pytorch_gather_rows, pytorch_segment_sum

KERNELS = ("pytorch", "triton")


@dataclass
class SortedGroups:
    """Equal keys of ``N`` inputs, grouped by a stable sort::

        keys     = [7 3 7 5 3]
        order    = [1 4 3 0 2]   # input at each sorted position: keys[order] = [3 3 5 7 7]
        segments = [0 0 1 2 2]   # group of each sorted position
        offsets  = [0 2 3 5]     # group g: sorted positions offsets[g]:offsets[g + 1]
        inverse  = [2 0 2 1 0]   # group of each input
    """

    order: torch.Tensor  # [N] int64
    segments: torch.Tensor  # [N] int64
    offsets: torch.Tensor  # [U + 1] int64
    inverse: torch.Tensor  # [N] int64
    # order[offsets[:-1]] where the grouping computed it already (else taken on demand)
    first_inputs: Optional[torch.Tensor] = None
    # Padded groupings: int64 [1] on the device, the number of real groups U; there are N
    # groups, the last N - U empty (offsets N, first input 0), so no shape waits for U.
    valid: Optional[torch.Tensor] = None

    @property
    def num_groups(self) -> int:
        return self.offsets.numel() - 1

    @property
    def counts(self) -> torch.Tensor:
        """Inputs per group ``[U]``."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def first(self) -> torch.Tensor:
        """The first input (in input order) of every group ``[U]``."""
        return self.first_inputs if self.first_inputs is not None else self.order[self.offsets[:-1]]


def sorted_groups(
    keys: torch.Tensor, minor: Optional[torch.Tensor] = None, *, padded: bool = False, kernel: str = "pytorch"
) -> SortedGroups:
    """Groups the equal entries of ``keys`` ``[N]`` (pairs ``(keys, minor)`` when ``minor``
    is given), sorted by key, then minor, then input position. Reads the number of groups
    back to the host once (every later shape depends on it), unless ``padded``: then N
    groups, the real count on the device (:attr:`SortedGroups.valid`; the PyTorch path
    still reads it). ``kernel='triton'``: what follows the sort is one kernel (the same
    tensors)."""
    _check_kernel(kernel)
    count = keys.numel()
    if minor is None:
        sorted_keys, order = torch.sort(keys, stable=True)
        starts = torch.ones(count, dtype=torch.bool, device=keys.device)
        starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    else:
        by_minor = torch.argsort(minor, stable=True)
        sorted_keys, within = torch.sort(keys[by_minor], stable=True)
        order = by_minor[within]
        sorted_minor = minor[order]
        starts = torch.ones(count, dtype=torch.bool, device=keys.device)
        starts[1:] = (sorted_keys[1:] != sorted_keys[:-1]) | (sorted_minor[1:] != sorted_minor[:-1])
    segments = torch.cumsum(starts, 0) - 1
    if kernel == "triton" and count:
        groups = None if padded else int(segments[-1]) + 1  # the host read
        kernels = _triton(keys.device, "sorted groups", "sorted_groups")
        offsets, inverse, first, valid = kernels.triton_group_index(order, segments, groups)
        return SortedGroups(order, segments, offsets, inverse, first, valid)
    groups = int(segments[-1]) + 1 if count else 0  # the host read
    offsets = torch.searchsorted(segments, torch.arange(groups + 1, device=keys.device))
    inverse = torch.empty_like(order).scatter_(0, order, segments)
    if not padded:
        return SortedGroups(order, segments, offsets, inverse)
    first = torch.cat([order[offsets[:-1]], order.new_zeros(count - groups)])
    offsets = torch.cat([offsets, offsets.new_full((count - groups,), count)])
    valid = torch.full((1,), groups, dtype=torch.int64, device=keys.device)
    return SortedGroups(order, segments, offsets, inverse, first, valid)


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}: choose one of {KERNELS}")


def _triton(device: torch.device, what: str, module: str = "segment_sum"):
    from megatron_gr.ops.triton.availability import require_triton

    require_triton(device, what=f"kernel='triton' ({what})")
    import importlib

    return importlib.import_module(f"megatron_gr.ops.triton.{module}")


def gather_rows(rows: torch.Tensor, index: torch.Tensor, *, kernel: str = "pytorch") -> torch.Tensor:
    """``rows[index]``: ``rows`` ``[U, D]`` float32, ``index`` ``[N]`` int64 -> ``[N, D]``."""
    _check_kernel(kernel)
    if rows.dim() != 2 or index.dtype != torch.int64:
        raise ValueError(f"rows must be [U, D] and index int64, got {tuple(rows.shape)} and {index.dtype}")
    if kernel == "triton":
        return _triton(rows.device, "row gather").triton_gather_rows(rows.contiguous(), index.contiguous())
    return pytorch_gather_rows(rows, index)


def segment_sum(values: torch.Tensor, groups: SortedGroups, *, kernel: str = "pytorch") -> torch.Tensor:
    """Float32 sum ``[U, D]`` of the rows ``values`` ``[N, D]`` of each group, every
    backend in the same order (:mod:`megatron_gr.ops.pytorch.segment_sum`)."""
    _check_kernel(kernel)
    if values.dim() != 2 or values.shape[0] != groups.order.numel():
        raise ValueError(f"values must be [{groups.order.numel()}, D], got {tuple(values.shape)}")
    args = (groups.order, groups.segments, groups.offsets)
    if kernel == "triton":
        return _triton(values.device, "segment sum").triton_segment_sum(values.contiguous(), *args)
    return pytorch_segment_sum(values, *args)
