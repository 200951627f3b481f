"""Triton kernels of :mod:`megatron_gr.ops.segment_sum`: the row gather and the segment sum
in the fixed order of :mod:`megatron_gr.ops.pytorch.segment_sum` (bit-identical to it).

The segment sum runs in two passes, with no atomics:

1. one program per window of ``CHUNK`` sorted positions walks them in order, adding rows to
   a running sum that it stores at every piece end: a group that lies inside the window
   goes straight to the output; the window's first piece, when its group began in an
   earlier window, goes to ``first[window]``; its last piece, when its group goes on into
   the next window, to ``last[window]``;
2. one program per window whose last piece began its group (the group started in this
   window and goes on) adds ``last[window]`` and the ``first`` pieces of the following
   windows, in order, and stores the group's sum.

Every program of pass 1 reads exactly ``CHUNK`` rows, so hot ids cost no more than others;
pass 2 touches only the groups that cross windows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_gr.ops.pytorch.segment_sum import CHUNK
from megatron_gr.ops.triton.dynamic_rows import ROW_WARPS, row_blocks


@triton.jit(do_not_specialize=["n"])
def _gather_rows_kernel(rows_ptr, index_ptr, out_ptr, n, dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < n
    cols = tl.arange(0, BLOCK_D)
    both = ok[:, None] & (cols < dim)[None, :]
    source = tl.load(index_ptr + rows, mask=ok, other=0)
    values = tl.load(rows_ptr + source[:, None] * dim + cols[None, :], mask=both, other=0.0)
    tl.store(out_ptr + rows[:, None] * dim + cols[None, :], values, mask=both)


def triton_gather_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    count, dim = index.numel(), rows.shape[1]
    out = torch.empty(count, dim, dtype=rows.dtype, device=rows.device)
    if count:
        block_r, block_d = row_blocks(dim)
        _gather_rows_kernel[(triton.cdiv(count, block_r),)](
            rows, index, out, count, dim, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=ROW_WARPS
        )
    return out


@triton.jit
def _add_position(acc, head, row, segment, following, p, stop, window, out_ptr, first_ptr, last_ptr, dim, cols, col_ok):
    """Adds sorted position ``p``'s row (zeros past ``stop``) to the running piece; at the
    piece's end stores it where pass 1 of the module docstring says and starts a new one."""
    ends = (p < stop) & ((following != segment) | (p == stop - 1))
    goes_on = following == segment  # at the window's last position: the group continues
    acc = acc + row
    tl.store(first_ptr + window * dim + cols, acc, mask=col_ok & ends & head)
    tl.store(last_ptr + window * dim + cols, acc, mask=col_ok & ends & ~head & goes_on)
    tl.store(out_ptr + segment * dim + cols, acc, mask=col_ok & ends & ~head & ~goes_on)
    return tl.where(ends, 0.0, acc), head & ~ends


@triton.jit
def _row_at(values_ptr, order_ptr, p, stop, dim, cols, col_ok):
    source = tl.load(order_ptr + p, mask=p < stop, other=0)
    return tl.load(values_ptr + source * dim + cols, mask=col_ok & (p < stop), other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["n"])
def _window_sums_kernel(
    values_ptr, order_ptr, seg_ptr, out_ptr, first_ptr, last_ptr, n, dim, CHUNK_C: tl.constexpr, BLOCK_D: tl.constexpr
):
    window = tl.program_id(0).to(tl.int64)
    start = window * CHUNK_C
    stop = tl.minimum(start + CHUNK_C, n)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    # The window's first piece continues a group of the previous window.
    head = (start > 0) & (tl.load(seg_ptr + start - 1, mask=start > 0, other=-1) == tl.load(seg_ptr + start))
    acc = tl.zeros([BLOCK_D], tl.float32)
    for k in range(start, stop, 4):
        # Four positions' loads first, so they are in flight together; then the ordered adds.
        s0 = tl.load(seg_ptr + k, mask=k < n, other=-1)
        s1 = tl.load(seg_ptr + k + 1, mask=k + 1 < n, other=-1)
        s2 = tl.load(seg_ptr + k + 2, mask=k + 2 < n, other=-1)
        s3 = tl.load(seg_ptr + k + 3, mask=k + 3 < n, other=-1)
        s4 = tl.load(seg_ptr + k + 4, mask=k + 4 < n, other=-1)
        r0 = _row_at(values_ptr, order_ptr, k, stop, dim, cols, col_ok)
        r1 = _row_at(values_ptr, order_ptr, k + 1, stop, dim, cols, col_ok)
        r2 = _row_at(values_ptr, order_ptr, k + 2, stop, dim, cols, col_ok)
        r3 = _row_at(values_ptr, order_ptr, k + 3, stop, dim, cols, col_ok)
        acc, head = _add_position(acc, head, r0, s0, s1, k, stop, window, out_ptr, first_ptr, last_ptr, dim, cols, col_ok)
        acc, head = _add_position(acc, head, r1, s1, s2, k + 1, stop, window, out_ptr, first_ptr, last_ptr, dim, cols, col_ok)
        acc, head = _add_position(acc, head, r2, s2, s3, k + 2, stop, window, out_ptr, first_ptr, last_ptr, dim, cols, col_ok)
        acc, head = _add_position(acc, head, r3, s3, s4, k + 3, stop, window, out_ptr, first_ptr, last_ptr, dim, cols, col_ok)


@triton.jit
def _piece(first_ptr, w, final, dim, cols, col_ok):
    return tl.load(first_ptr + w * dim + cols, mask=col_ok & (w <= final), other=0.0)


@triton.jit(do_not_specialize=["n"])
def _join_pieces_kernel(seg_ptr, offsets_ptr, first_ptr, last_ptr, out_ptr, n, dim, CHUNK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    window = tl.program_id(0).to(tl.int64)
    start = window * CHUNK_C
    stop = tl.minimum(start + CHUNK_C, n)
    segment = tl.load(seg_ptr + stop - 1)
    goes_on = tl.load(seg_ptr + stop, mask=stop < n, other=-1) == segment
    if goes_on & (tl.load(offsets_ptr + segment) >= start):  # this window's last piece began the group
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < dim
        final = (tl.load(offsets_ptr + segment + 1) - 1) // CHUNK_C  # window of the group's last row
        acc = tl.zeros([BLOCK_D], tl.float32) + tl.load(last_ptr + window * dim + cols, mask=col_ok, other=0.0)
        for w in range(window + 1, final + 1, 8):
            # Eight pieces' loads in flight, then the ordered adds. Pieces past the group's
            # last read +0.0, which leaves the sum unchanged (a sum from +0.0 is never -0.0).
            p0 = _piece(first_ptr, w, final, dim, cols, col_ok)
            p1 = _piece(first_ptr, w + 1, final, dim, cols, col_ok)
            p2 = _piece(first_ptr, w + 2, final, dim, cols, col_ok)
            p3 = _piece(first_ptr, w + 3, final, dim, cols, col_ok)
            p4 = _piece(first_ptr, w + 4, final, dim, cols, col_ok)
            p5 = _piece(first_ptr, w + 5, final, dim, cols, col_ok)
            p6 = _piece(first_ptr, w + 6, final, dim, cols, col_ok)
            p7 = _piece(first_ptr, w + 7, final, dim, cols, col_ok)
            acc = acc + p0
            acc = acc + p1
            acc = acc + p2
            acc = acc + p3
            acc = acc + p4
            acc = acc + p5
            acc = acc + p6
            acc = acc + p7
        tl.store(out_ptr + segment * dim + cols, acc, mask=col_ok)


def triton_segment_sum(values, order, segments, offsets, *, chunk: int = CHUNK, padded: bool = False) -> torch.Tensor:
    """``padded``: ``offsets`` past the groups are N; their rows, which no program writes, are zeros."""
    count, dim = order.numel(), values.shape[1]
    out = (torch.zeros if padded else torch.empty)(offsets.numel() - 1, dim, dtype=torch.float32, device=values.device)
    if count == 0:
        return out
    windows = triton.cdiv(count, chunk)
    first = torch.empty(windows, dim, dtype=torch.float32, device=values.device)
    last = torch.empty_like(first)
    block_d = max(triton.next_power_of_2(dim), 32)
    _window_sums_kernel[(windows,)](
        values, order, segments, out, first, last, count, dim, CHUNK_C=chunk, BLOCK_D=block_d, num_warps=1
    )
    _join_pieces_kernel[(windows,)](
        segments, offsets, first, last, out, count, dim, CHUNK_C=chunk, BLOCK_D=block_d, num_warps=1
    )
    return out


# ----------------------------------------------------------------------------- grouping
# After the stable sort, the groups of :func:`megatron_gr.ops.segment_sum.sorted_groups` in
# two kernels: (1) per tile of sorted positions, its number of group starts and the last
# one; (2) per tile, the tile's first group from the earlier tiles' counts (a short loop:
# there are at most TILES_MAX tiles), then every output of a position at once: its group,
# the inverse at its input, and at a group's start its offset, first input, key and the
# ``take`` values; at a group's end its size (from the start, carried across tiles).
GROUP_SUB = 1024  # sorted positions a program handles at once
TILES_MAX = 2048  # tiles past this grow (a program then walks its tile in GROUP_SUB steps)
# Earlier tiles' counts a program reads at once: fixed, not sized by the query count, so a
# count crossing a power of two compiles nothing new (a compile in a training step costs
# hundreds of milliseconds).
TILES_BLOCK = 128


@triton.jit
def _starts_at(keys_ptr, minor_ptr, p, n, HAS_MINOR: tl.constexpr):
    """Whether sorted position ``p`` starts a group (False past ``n``)."""
    ok = p < n
    here = tl.load(keys_ptr + p, mask=ok, other=0)
    before = tl.load(keys_ptr + p - 1, mask=ok & (p > 0), other=0)
    starts = (p == 0) | (here != before)
    if HAS_MINOR:
        m_here = tl.load(minor_ptr + p, mask=ok, other=0)
        m_before = tl.load(minor_ptr + p - 1, mask=ok & (p > 0), other=0)
        starts = starts | (m_here != m_before)
    return ok & starts


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit(do_not_specialize=["n"])
def _tile_starts_kernel(keys_ptr, minor_ptr, counts_ptr, last_ptr, n, HAS_MINOR: tl.constexpr, TILE: tl.constexpr, SUB: tl.constexpr):
    tile = tl.program_id(0).to(tl.int64)
    total = tl.zeros([SUB], tl.int32)
    last = tl.full([SUB], -1, tl.int64)
    for s in range(0, TILE, SUB):
        p = tile * TILE + s + tl.arange(0, SUB)
        starts = _starts_at(keys_ptr, minor_ptr, p, n, HAS_MINOR)
        total += starts.to(tl.int32)
        last = tl.maximum(last, tl.where(starts, p, -1))
    tl.store(counts_ptr + tile, tl.sum(total))
    tl.store(last_ptr + tile, tl.max(last))


@triton.jit(do_not_specialize=["n", "tiles"])
def _tile_groups_kernel(
    keys_ptr, minor_ptr, order_ptr, tile_counts_ptr, tile_last_ptr,
    segments_ptr, inverse_ptr, offsets_ptr, first_ptr, unique_ptr, counts_ptr,
    take0_ptr, out0_ptr, take1_ptr, out1_ptr,
    n, tiles,
    HAS_MINOR: tl.constexpr, TAKE: tl.constexpr, TILE: tl.constexpr, SUB: tl.constexpr, TILES_BLOCK: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    # Groups started before this tile, and the last start before it (the start of a group
    # that runs into it; tile 0 begins with a start).
    before = tl.zeros([TILES_BLOCK], tl.int64)
    carry = tl.full([TILES_BLOCK], -1, tl.int64)
    for c in range(0, tiles, TILES_BLOCK):
        t = c + tl.arange(0, TILES_BLOCK)
        earlier = t < tile
        before += tl.load(tile_counts_ptr + t, mask=earlier, other=0).to(tl.int64)
        carry = tl.maximum(carry, tl.load(tile_last_ptr + t, mask=earlier, other=-1))
    group_base = tl.sum(before)  # groups before the current sub-tile
    start_carry = tl.max(carry)  # start of the group open at the current sub-tile
    for s in range(0, TILE, SUB):
        p = tile * TILE + s + tl.arange(0, SUB)
        ok = p < n
        starts = _starts_at(keys_ptr, minor_ptr, p, n, HAS_MINOR)
        ends = ok & ((p == n - 1) | _starts_at(keys_ptr, minor_ptr, p + 1, n, HAS_MINOR))
        flags = starts.to(tl.int64)
        segment = group_base + tl.cumsum(flags, 0) - 1
        group_start = tl.maximum(tl.associative_scan(tl.where(starts, p, -1), 0, _max_combine), start_carry)
        source = tl.load(order_ptr + p, mask=ok, other=0)
        tl.store(segments_ptr + p, segment, mask=ok)
        tl.store(inverse_ptr + source, segment, mask=ok)
        tl.store(offsets_ptr + segment, p, mask=starts)
        tl.store(first_ptr + segment, source, mask=starts)
        tl.store(unique_ptr + segment, tl.load(keys_ptr + p, mask=starts, other=0), mask=starts)
        if TAKE >= 1:
            tl.store(out0_ptr + segment, tl.load(take0_ptr + source, mask=starts, other=0), mask=starts)
        if TAKE >= 2:
            tl.store(out1_ptr + segment, tl.load(take1_ptr + source, mask=starts, other=0), mask=starts)
        tl.store(counts_ptr + segment, p + 1 - group_start, mask=ends)
        tl.store(offsets_ptr + segment + 1, p + 1, mask=ok & (p == n - 1))
        group_base += tl.sum(flags)
        start_carry = tl.maximum(start_carry, tl.max(tl.where(starts, p, -1)))


def triton_sorted_groups(sorted_keys, sorted_minor, order, take, *, count_on_host: bool = True):
    """:func:`megatron_gr.ops.segment_sum.sorted_groups` after its sort (``N`` >= 1), the
    PyTorch path's values. Outputs of ``U`` entries are written into ``N``-entry buffers and
    cut to ``U`` after the host read: nothing runs after it. Without the read
    (``count_on_host=False``) the buffers are returned whole, their padding set first
    (offsets N, counts, first, unique and taken 0)."""
    from megatron_gr.ops.segment_sum import SortedGroups

    count, device = sorted_keys.numel(), sorted_keys.device
    take, extra = take[:2], take[2:]
    tile = max(GROUP_SUB, triton.next_power_of_2(triton.cdiv(count, TILES_MAX)))
    tiles = triton.cdiv(count, tile)
    minor = sorted_minor if sorted_minor is not None else sorted_keys
    tile_counts = torch.empty(tiles, dtype=torch.int32, device=device)
    tile_last = torch.empty(tiles, dtype=torch.int64, device=device)
    _tile_starts_kernel[(tiles,)](
        sorted_keys, minor, tile_counts, tile_last, count, HAS_MINOR=sorted_minor is not None, TILE=tile, SUB=GROUP_SUB,
        num_warps=4,
    )
    segments = torch.empty(count, dtype=torch.int64, device=device)
    inverse = torch.empty(count, dtype=torch.int64, device=device)
    pad = torch.empty if count_on_host else torch.zeros  # where the kernel writes no group
    if count_on_host:
        offsets = torch.empty(count + 1, dtype=torch.int64, device=device)
    else:
        offsets = torch.full((count + 1,), count, dtype=torch.int64, device=device)  # past the groups: N
    first = pad(count, dtype=torch.int64, device=device)
    unique = pad(count, dtype=sorted_keys.dtype, device=device)
    counts = pad(count, dtype=torch.int64, device=device)
    outs = [pad(count, dtype=t.dtype, device=device) for t in take]
    pairs = [(t.contiguous(), o) for t, o in zip(take, outs)] + [(segments, segments)] * (2 - len(take))  # unused
    _tile_groups_kernel[(tiles,)](
        sorted_keys, minor, order, tile_counts, tile_last,
        segments, inverse, offsets, first, unique, counts,
        pairs[0][0], pairs[0][1], pairs[1][0], pairs[1][1],
        count, tiles,
        HAS_MINOR=sorted_minor is not None, TAKE=len(take), TILE=tile, SUB=GROUP_SUB,
        TILES_BLOCK=TILES_BLOCK, num_warps=4,
    )
    if not count_on_host:
        result = SortedGroups(
            order, segments, offsets, inverse, unique, taken=tuple(outs), first_=first, counts_=counts, valid=segments[-1] + 1
        )
        if extra:
            result.taken += tuple(t[first] for t in extra)
        return result
    groups = int(segments[-1]) + 1  # the host read
    result = SortedGroups(
        order, segments, offsets[: groups + 1], inverse, unique[:groups],
        taken=tuple(o[:groups] for o in outs), first_=first[:groups], counts_=counts[:groups],
    )
    if extra:
        result.taken += tuple(t[result.first] for t in extra)
    return result
