"""Rows grouped by equal keys: the grouping (one stable sort), the gather of each input's
group row and its backward, the per-group gradient sum in a fixed order.

- :func:`sorted_groups`: equal keys grouped by a stable sort, any device, one host read
  (the number of groups; or none, with the outputs padded to the input count); with
  Triton, the steps after the sort are two kernels.
- :func:`gather_rows`: ``rows[index]``.
- :func:`segment_sum`: per group, the sum of its rows in the order
  :mod:`megatron_gr.ops.pytorch.segment_sum` fixes (bit-identical on every backend).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from megatron_gr.ops.backend import KernelBackend, check_backend, require_backend
from megatron_gr.ops.pytorch.segment_sum import pytorch_gather_rows, pytorch_segment_sum


@dataclass
class SortedGroups:
    """Equal keys of ``N`` inputs, grouped by a stable sort::

        keys     = [7 3 7 5 3]
        order    = [1 4 3 0 2]   # input at each sorted position: keys[order] = [3 3 5 7 7]
        segments = [0 0 1 2 2]   # group of each sorted position
        offsets  = [0 2 3 5]     # group g: sorted positions offsets[g]:offsets[g + 1]
        inverse  = [2 0 2 1 0]   # group of each input
        unique   = [3 5 7]       # the key of each group
    """

    order: torch.Tensor  # [N] int64
    segments: torch.Tensor  # [N] int64
    offsets: torch.Tensor  # [U + 1] int64
    inverse: torch.Tensor  # [N] int64
    unique: torch.Tensor  # [U], keys' dtype
    taken: tuple[torch.Tensor, ...] = ()  # each ``take`` tensor at every group's first input [U]
    first_: Optional[torch.Tensor] = field(default=None, repr=False)  # set where computed already
    counts_: Optional[torch.Tensor] = field(default=None, repr=False)
    # Padded (``sorted_groups(..., count_on_host=False)``): the number of groups, a device
    # scalar, and every [U] field above is [N] (offsets [N + 1]). Entries past the groups
    # are padding: offsets N, counts 0, first 0; unique and taken hold a real group's
    # values or zeros.
    valid: Optional[torch.Tensor] = None

    @property
    def num_groups(self) -> int:
        """The number of groups (of padded entries included, when padded)."""
        return self.offsets.numel() - 1

    @property
    def counts(self) -> torch.Tensor:
        """Inputs per group ``[U]``."""
        if self.counts_ is None:
            self.counts_ = self.offsets[1:] - self.offsets[:-1]
        return self.counts_

    @property
    def first(self) -> torch.Tensor:
        """The first input (in input order) of every group ``[U]``."""
        if self.first_ is None:
            self.first_ = self.order[self.offsets[:-1]]
        return self.first_


def sorted_groups(
    keys: torch.Tensor,
    minor: Optional[torch.Tensor] = None,
    *,
    take: Sequence[torch.Tensor] = (),
    kernel: KernelBackend = KernelBackend.PYTORCH,
    count_on_host: bool = True,
) -> SortedGroups:
    """Groups the equal entries of ``keys`` ``[N]`` (pairs ``(keys, minor)`` when ``minor``
    is given), sorted by key, then minor, then input position. ``take``: tensors ``[N]``
    read at every group's first input (``groups.taken``). Reads the number of groups back to
    the host once (every later shape depends on it); with ``count_on_host=False`` it does
    not: the outputs keep ``N`` entries and ``groups.valid`` holds the count on the device
    (see :class:`SortedGroups`). The sort is PyTorch's on every backend; with
    ``kernel="triton"`` everything after it is two kernels, the same values."""
    kernel = check_backend(kernel)
    count = keys.numel()
    if any(t.shape != (count,) for t in take):
        raise ValueError(f"take tensors must be [{count}]")
    if minor is None:
        sorted_keys, order = torch.sort(keys, stable=True)
        sorted_minor = None
    else:
        by_minor = torch.argsort(minor, stable=True)
        sorted_keys, within = torch.sort(keys[by_minor], stable=True)
        order = by_minor[within]
        sorted_minor = minor[order]
    if kernel == "triton" and count:
        return _triton(keys.device, "grouping").triton_sorted_groups(
            sorted_keys, sorted_minor, order, tuple(take), count_on_host=count_on_host
        )
    starts = torch.ones(count, dtype=torch.bool, device=keys.device)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    if sorted_minor is not None:
        starts[1:] |= sorted_minor[1:] != sorted_minor[:-1]
    segments = torch.cumsum(starts, 0) - 1
    inverse = torch.empty_like(order).scatter_(0, order, segments)
    if count_on_host:
        groups = int(segments[-1]) + 1 if count else 0  # the host read
        offsets = torch.searchsorted(segments, torch.arange(groups + 1, device=keys.device))
        result = SortedGroups(order, segments, offsets, inverse, sorted_keys[offsets[:-1]])
    else:  # offsets past the last group are N (searchsorted of the missing groups)
        offsets = torch.searchsorted(segments, torch.arange(count + 1, device=keys.device))
        padded = offsets[:-1] < count
        first = torch.where(padded, order[offsets[:-1].clamp(max=max(count - 1, 0))], 0)
        valid = segments[-1] + 1 if count else torch.zeros((), dtype=torch.int64, device=keys.device)
        result = SortedGroups(order, segments, offsets, inverse, keys[first], first_=first, valid=valid)
    if take:
        result.taken = tuple(t[result.first] for t in take)
    return result


def _triton(device: torch.device, what: str):
    require_backend(KernelBackend.TRITON, device, what=what)
    from megatron_gr.ops.triton import segment_sum

    return segment_sum


def gather_rows(rows: torch.Tensor, index: torch.Tensor, *, kernel: KernelBackend = KernelBackend.PYTORCH) -> torch.Tensor:
    """``rows[index]``: ``rows`` ``[U, D]`` float32, ``index`` ``[N]`` int64 -> ``[N, D]``."""
    kernel = check_backend(kernel)
    if rows.dim() != 2 or index.dtype != torch.int64:
        raise ValueError(f"rows must be [U, D] and index int64, got {tuple(rows.shape)} and {index.dtype}")
    if kernel == "triton":
        return _triton(rows.device, "row gather").triton_gather_rows(rows.contiguous(), index.contiguous())
    return pytorch_gather_rows(rows, index)


def segment_sum(values: torch.Tensor, groups: SortedGroups, *, kernel: KernelBackend = KernelBackend.PYTORCH) -> torch.Tensor:
    """Float32 sum ``[U, D]`` of the rows ``values`` ``[N, D]`` of each group, every
    backend in the same order (:mod:`megatron_gr.ops.pytorch.segment_sum`); padded groups
    (``groups.valid``) get zero rows."""
    kernel = check_backend(kernel)
    if values.dim() != 2 or values.shape[0] != groups.order.numel():
        raise ValueError(f"values must be [{groups.order.numel()}, D], got {tuple(values.shape)}")
    args = (groups.order, groups.segments, groups.offsets)
    if kernel == "triton":
        return _triton(values.device, "segment sum").triton_segment_sum(values.contiguous(), *args, padded=groups.valid is not None)
    if groups.valid is None:
        return pytorch_segment_sum(values, *args)
    real = int(groups.valid)  # the reference reads it (padded groups sum to zero rows)
    out = torch.zeros(groups.num_groups, values.shape[1], dtype=torch.float32, device=values.device)
    out[:real] = pytorch_segment_sum(values, groups.order, groups.segments, groups.offsets[: real + 1])
    return out
