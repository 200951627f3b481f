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


def triton_segment_sum(values, order, segments, offsets, *, chunk: int = CHUNK) -> torch.Tensor:
    count, dim = order.numel(), values.shape[1]
    out = torch.empty(offsets.numel() - 1, dim, dtype=torch.float32, device=values.device)
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
