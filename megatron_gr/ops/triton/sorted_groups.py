"""Triton kernel of :func:`megatron_gr.ops.segment_sum.sorted_groups` after the sort: the
group offsets, each input's group and each group's first input in one pass over the sorted
positions, instead of a searchsorted, a scatter and a gather (launches that run after the
sort, where every launch's latency shows).

Padded (``N`` groups, the last ``N - U`` empty, ``U`` written to the device only): it fills
the padding too, so no host read and no separate fill is needed."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit(do_not_specialize=["n"])
def _group_index_kernel(
    order_ptr, seg_ptr, offsets_ptr, inverse_ptr, first_ptr, valid_ptr, n, BLOCK_C: tl.constexpr, PADDED: tl.constexpr
):
    p = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = p < n
    segment = tl.load(seg_ptr + p, mask=ok, other=0)
    before = tl.load(seg_ptr + p - 1, mask=ok & (p > 0), other=-1)
    source = tl.load(order_ptr + p, mask=ok, other=0)
    starts = ok & (segment != before)
    tl.store(inverse_ptr + source, segment, mask=ok)
    tl.store(offsets_ptr + segment, p, mask=starts)
    tl.store(first_ptr + segment, source, mask=starts)
    tl.store(offsets_ptr + segment + 1, p + 1, mask=ok & (p == n - 1))
    if PADDED:  # groups U..N-1 are empty: they start and end at N, their first input is 0
        groups = tl.load(seg_ptr + n - 1) + 1
        padding = ok & (p >= groups)
        tl.store(offsets_ptr + p + 1, tl.zeros_like(p) + n, mask=padding)
        tl.store(first_ptr + p, tl.zeros_like(p), mask=padding)
        tl.store(valid_ptr + p, tl.zeros_like(p) + groups, mask=p == 0)


def triton_group_index(order: torch.Tensor, segments: torch.Tensor, groups: int | None):
    """``offsets`` ``[groups + 1]``, ``inverse`` ``[N]``, ``first`` ``[groups]`` of a stable
    sort's ``order`` and ``segments`` (``N >= 1``); with ``groups`` None, padded to ``N``
    groups, and also the real count ``valid`` ``[1]`` (else None)."""
    count = order.numel()
    padded = groups is None
    size = count if padded else groups
    offsets = torch.empty(size + 1, dtype=torch.int64, device=order.device)
    inverse = torch.empty_like(order)
    first = torch.empty(size, dtype=torch.int64, device=order.device)
    valid = torch.empty(1, dtype=torch.int64, device=order.device) if padded else None
    _group_index_kernel[(triton.cdiv(count, BLOCK),)](
        order, segments, offsets, inverse, first, valid if padded else offsets, count, BLOCK_C=BLOCK, PADDED=padded
    )
    return offsets, inverse, first, valid
