"""The relative attention bias of one tile, for the HSTU attention kernels.

Per pair the bias is ``PosW[min(|i - j|, P - 1)] + TimeW[bucket(|ts_i - ts_j|)]``: two
bucket computations (the time bucket is an int64 square root or log with exact
corrections) and two gathers per score, as much work as the tile's two matrix products.
Both bucket functions are monotone in their argument, so a tile whose smallest and largest
distance (gap) fall in one bucket has one position (time) weight for every pair; from the
tile's geometry and the ranges of its rows' and columns' timestamps that is decided with
a few scalar operations, and such a tile adds one loaded weight instead of a gathered tile.
Far from the diagonal (``|i - j| >= P - 1``) every tile is uniform in position, and past
the last time bucket (gaps of ``NT^2`` seconds with ``sqrt`` buckets) uniform in time:
long histories are mostly such tiles. The backward adds a uniform tile's gradient with one
atomic add instead of one per pair.

``UNIFORM=False`` keeps the per-pair path everywhere (the benchmark's "before";
``hstu_configs.override(uniform_bias_tiles=False)``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from megatron_gr.ops.triton.hstu_tiles import gather, time_bucket


@triton.jit
def valid_range(ts, valid):
    """(min, max) of the int64 timestamps ``ts`` where ``valid`` (at least one is)."""
    lo = tl.min(tl.where(valid, ts, 2305843009213693952), 0)
    hi = tl.max(tl.where(valid, ts, -2305843009213693952), 0)
    return lo, hi


@triton.jit
def tile_distance(m0, n0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A lower bound of ``|i - j|`` over the tile of queries [m0, m0 + BLOCK_M) and keys
    [n0, n0 + BLOCK_N) (exact for tiles off the diagonal)."""
    return tl.maximum(tl.maximum(m0 - (n0 + BLOCK_N - 1), n0 - (m0 + BLOCK_M - 1)), 0)


@triton.jit
def add_tile_bias(
    x, ri, ci, ts_r, ts_c, far, tr_lo, tr_hi, tc_lo, tc_hi, PosW, TimeW, P, NT,
    TIME_FN: tl.constexpr, ASM_GATHER: tl.constexpr, UNIFORM: tl.constexpr,
):
    """``x`` (a tile of scores) plus the bias of its pairs (row ``ri``, column ``ci``:
    broadcastable position index tensors; timestamps ``ts_r``, ``ts_c`` likewise).

    ``far``: :func:`tile_distance` of the tile; ``tr_lo``..``tc_hi``: the ranges of the
    valid rows' and columns' timestamps (:func:`valid_range`). Returns ``(x + bias,
    pos_uniform, time_uniform, time_bucket_if_uniform)``; with ``UNIFORM`` off the flags are
    False. The bias is added inside each branch (no bias tile is kept beside ``x``)."""
    if UNIFORM:
        gap_hi = tl.maximum(tr_hi - tc_lo, tc_hi - tr_lo)
        gap_lo = tl.maximum(tl.maximum(tr_lo - tc_hi, tc_lo - tr_hi), 0)
        t_one = time_bucket(gap_lo, NT, TIME_FN)
        time_uniform = t_one == time_bucket(gap_hi, NT, TIME_FN)
        pos_uniform = far >= P - 1
        if pos_uniform:
            x += tl.load(PosW + P - 1)
        else:
            x += gather(PosW, tl.minimum(tl.abs(ri - ci), P - 1), ASM_GATHER)
        if time_uniform:
            x += tl.load(TimeW + t_one)
        else:
            x += gather(TimeW, time_bucket(tl.abs(ts_r - ts_c), NT, TIME_FN), ASM_GATHER)
    else:
        pos = tl.minimum(tl.abs(ri - ci), P - 1)
        tb = time_bucket(tl.abs(ts_r - ts_c), NT, TIME_FN)
        x += gather(PosW, pos, ASM_GATHER) + gather(TimeW, tb, ASM_GATHER)
        pos_uniform = False
        time_uniform = False
        t_one = 0
    return x, pos_uniform, time_uniform, t_one


@triton.jit
def add_bias_grad(
    dx, ri, ci, ts_r, ts_c, pos_uniform, time_uniform, t_one, far, slot, DPosW, DTimeW, P, NT, allowed,
    TIME_FN: tl.constexpr, MASKED: tl.constexpr, UNIFORM: tl.constexpr,
):
    """Adds ``dx`` (a tile of the pairs (``ri``, ``ci``), zero where masked) to the weight
    gradients of its position and time buckets: one atomic add for a uniform tile (with
    ``UNIFORM``; without it, tiles far from the diagonal and tiles whose time buckets all
    agree, found by reducing the bucket tile), else one per pair. The buckets are computed
    again here rather than kept from the forward part of the tile: fewer live registers
    across the tile's products."""
    if UNIFORM:
        one_pos = pos_uniform
        one_time = time_uniform
        time_bucket_id = t_one
    else:
        one_pos = far >= P - 1
        tb = time_bucket(tl.abs(ts_r - ts_c), NT, TIME_FN)
        time_bucket_id = tl.min(tl.min(tb, 1), 0)
        one_time = time_bucket_id == tl.max(tl.max(tb, 1), 0)
    if one_pos:
        tl.atomic_add(DPosW + slot * P + P - 1, tl.sum(tl.sum(dx, 1), 0), sem="relaxed")
    else:
        pos = tl.minimum(tl.abs(ri - ci), P - 1)
        if MASKED:
            tl.atomic_add(DPosW + slot * P + pos, dx, mask=allowed, sem="relaxed")
        else:
            tl.atomic_add(DPosW + slot * P + pos, dx, sem="relaxed")
    if one_time:
        tl.atomic_add(DTimeW + slot * NT + time_bucket_id, tl.sum(tl.sum(dx, 1), 0), sem="relaxed")
    else:
        if UNIFORM:
            tb = time_bucket(tl.abs(ts_r - ts_c), NT, TIME_FN)
        if MASKED:
            tl.atomic_add(DTimeW + slot * NT + tb, dx, mask=allowed, sem="relaxed")
        else:
            tl.atomic_add(DTimeW + slot * NT + tb, dx, sem="relaxed")
