"""Device functions shared by the stream-wise mHC kernels (aggregate, merge, the fused merge pairs).

A token tile of the streams ``x`` ``[T, n, C]`` is held as a tuple of n
``[BLOCK_T, BLOCK_C]`` float32 tiles, one per stream, instead of one
``[BLOCK_T, n, BLOCK_C]`` tensor: sums over the streams are then register adds, whereas a
3-D tile spreads the stream axis over warps and every sum over it goes through shared
memory. With ``BLOCK_C`` spanning 512 bytes of a token's channels (256 16-bit or 128 32-bit
values, one 16-byte access per lane) and ``BLOCK_T`` a multiple of the warps, a warp holds
whole token rows of the chunk, so a sum over the channels of a token stays within a warp.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def stream_tiles(X, stream0, mask, C, n: tl.constexpr):
    """The n ``[BLOCK_T, BLOCK_C]`` tiles of ``X`` at ``stream0`` (stream i at
    ``stream0 + i C``) in float32, as a tuple: every load is issued before the first use."""
    tiles = ()
    for i in tl.static_range(n):
        tiles = tiles + (tl.load(X + stream0 + i * C, mask=mask, other=0.0).to(tl.float32),)
    return tiles


@triton.jit
def map_column(H, offsets, live):
    """One map entry per token of the tile (``H[offsets]``) as a ``[BLOCK_T, 1]`` float32
    column: loaded as a vector, one load per token rather than one per channel."""
    return tl.load(H + offsets, mask=live, other=0.0).to(tl.float32)[:, None]


@triton.jit
def streams_of(X, rows, c, mask, C, n: tl.constexpr, S: tl.constexpr):
    """The n stream tiles of a token tile's channels ``c`` from ``X`` ``[T, S, C]``: its S = n
    streams, or with S = 1 the block input standing for its n copies (the one tile, n
    times: the expansion never reaches memory)."""
    tiles = stream_tiles(X, rows[:, None] * (S * C) + c[None, :], mask, C, S)
    if S == 1:
        copies = ()
        for i in tl.static_range(n):
            copies = copies + (tiles[0],)
        tiles = copies
    return tiles


@triton.jit
def merged_stream(x, u, HRes, HPost, rows, live, i: tl.constexpr, n: tl.constexpr):
    """Stream i after a merge, ``h_post[t, i] u + sum_j h_res[t, i, j] x_j`` (float32), from
    the n stream tiles ``x`` and the sublayer update ``u`` (the plain merge's order of sums)."""
    out = map_column(HPost, rows * n + i, live) * u
    for j in tl.static_range(n):
        out += map_column(HRes, rows * (n * n) + i * n + j, live) * x[j]
    return out
