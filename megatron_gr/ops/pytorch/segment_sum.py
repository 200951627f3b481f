"""Reference gather and segment sum of rows grouped by a stable sort (vectorised PyTorch).

The segment sum fixes its summation order, so every backend gives the same bits (the
Triton kernel reproduces it exactly; tests compare with ``torch.equal``). Rows are taken in
sorted order (``values[order]``) and cut into *pieces* wherever a group starts and at every
multiple of ``chunk`` sorted positions::

    sorted positions  0 1 2 3 | 4 5 6 7 | 8 9        chunk = 4
    segments          0 0 1 1 | 1 1 1 1 | 1 2
    pieces            [0 1][2 3] [4 . . 7] [8][9]

A piece is summed left to right starting from +0.0; a group's pieces are then summed left
to right starting from +0.0. Only additions, so no fused multiply-add can change a bit, and
no piece is longer than ``chunk`` (a hot id seen 67,000 times is 262 pieces a GPU sums in
parallel, then joins).
"""

from __future__ import annotations

import torch

# Sorted positions per piece window: a Triton program sums one window.
CHUNK = 256


def pytorch_gather_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``rows[index]``: ``[U, D]``, ``[N]`` -> ``[N, D]``."""
    return rows.index_select(0, index)


def pytorch_segment_sum(
    values: torch.Tensor, order: torch.Tensor, segments: torch.Tensor, offsets: torch.Tensor, *, chunk: int = CHUNK
) -> torch.Tensor:
    """Per group, the float32 sum ``[U, D]`` of the rows ``values`` ``[N, D]`` whose group it
    is, in the order of the module docstring. ``order`` ``[N]``: input row at each sorted
    position; ``segments`` ``[N]``: group of each sorted position; ``offsets`` ``[U + 1]``:
    group g covers sorted positions ``offsets[g]:offsets[g + 1]``."""
    if values.device.type != "cpu":
        # index_add_ keeps index order only on the CPU (on a GPU it adds with atomics in no
        # fixed order), so the reference sums there: the same bits on every device.
        on_cpu = (t.cpu() for t in (values, order, segments, offsets))
        return pytorch_segment_sum(*on_cpu, chunk=chunk).to(values.device)
    count, dim = order.numel(), values.shape[1]
    groups = offsets.numel() - 1
    if count == 0:
        return torch.zeros(groups, dim, dtype=torch.float32, device=values.device)
    positions = torch.arange(count, device=values.device)
    piece_start = (positions % chunk) == 0
    piece_start.index_fill_(0, offsets[:-1], True)
    piece = torch.cumsum(piece_start, 0) - 1  # [N] piece of each sorted position
    # index_add_ accumulates in index order on the CPU (a test holds it to that), so each
    # piece is summed left to right, then each group's pieces.
    partial = torch.zeros(int(piece[-1]) + 1, dim, dtype=torch.float32, device=values.device)
    partial.index_add_(0, piece, values.index_select(0, order).to(torch.float32))
    out = torch.zeros(groups, dim, dtype=torch.float32, device=values.device)
    return out.index_add_(0, segments[piece_start], partial)
