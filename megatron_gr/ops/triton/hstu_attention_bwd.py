"""Backward kernels of jagged HSTU attention.

With x = alpha q k^T + bias, P = SiLU(x) * mask and out = P v / n:

    dv = P^T do / n          dx = (do v^T) * SiLU'(x) * mask / n
    dk = alpha dx^T q        dq = alpha dx k          dbias = sum over heads of dx

``hstu_bwd_dkdv_kernel``: one program per (sequence, head, key block) streams the query
blocks that see its keys, accumulating dk and dv on chip; it also adds the relative-bias
weight gradients and, with ``ATOMIC_DQ``, each tile's share of dq into an fp32 buffer
(five matrix products per tile). Without it, ``hstu_bwd_dq_kernel`` (one program per query
block, streaming key blocks) recomputes x and do v^T for dq: seven products per tile in
all, no atomics, deterministic.

Split variant: the same key-block kernel launched twice, once with only ``WITH_DV`` (x, P,
dv += P^T do: two products) and once with only ``WITH_DK`` (x, do v^T, dk += dx^T q:
three), so that each program holds one [BLOCK_N, D] fp32 accumulator instead of two: at
D = 256 the fused program needs both (128 registers per thread at 8 warps, spilling), the
split ones fit key blocks of 128 rows without spills. Eight products per tile with the dq
kernel instead of seven.

Relative-bias weight gradients: a tile whose pairs all fall in one bucket (far from the
diagonal for positions; common for time gaps past the last bucket) adds one sum; other
tiles add per pair, into one of ``NUM_SLOTS`` private copies of the gradient to spread the
atomic traffic (the caller sums the copies). Such uniform tiles also read one weight
instead of gathering a tile (:mod:`megatron_gr.ops.triton.hstu_bias_tiles`).

``SHARDED``: query segments against their own keys, as in the forward kernel; a key block
visits the query blocks of its segment only, the first of which may start before the
segment's first row (rows outside ``[p0, LQ)`` are loaded as zeros and masked).
"""

from __future__ import annotations

import triton
import triton.language as tl

from megatron_gr.ops.triton.hstu_bias_tiles import add_bias_grad, add_tile_bias, tile_distance, valid_range
from megatron_gr.ops.triton.hstu_tiles import (
    key_ranges, load_rows, load_rows_between, mma, pair_mask, query_ranges, silu, silu_and_grad,
)


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, q_base, do_base, dq_base, stride_qt, stride_dot, stride_dqt, m0, offs_n, ts_j, tj_lo, tj_hi, ts_base,
    PosW, TimeW, DPosW, DTimeW, slot, n0,
    LQ, LK, H, c, w, g, p0, alpha, inv_n, P, NT,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr, TIME_FN: tl.constexpr,
    FAST_SILU: tl.constexpr, ASM_GATHER: tl.constexpr, PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    WITH_DK: tl.constexpr, WITH_DV: tl.constexpr, SHARDED: tl.constexpr, UNIFORM_BIAS: tl.constexpr,
):
    offs_m = m0 + tl.arange(0, BLOCK_M)
    if SHARDED and MASKED:
        q = load_rows_between(q_base, offs_m, stride_qt, p0, LQ, DQK, BLOCK_DQK)  # [BLOCK_M, Dqk]
        do = load_rows_between(do_base, offs_m, stride_dot, p0, LQ, DV, BLOCK_DV)  # [BLOCK_M, Dv]
    else:
        q = load_rows(q_base, offs_m, stride_qt, LQ, DQK, BLOCK_DQK, MASKED)  # [BLOCK_M, Dqk]
        do = load_rows(do_base, offs_m, stride_dot, LQ, DV, BLOCK_DV, MASKED)  # [BLOCK_M, Dv]
    # Transposed tile: rows are keys, columns queries.
    x = mma(k, tl.trans(q), None, PRECISION) * alpha  # [BLOCK_N, BLOCK_M]
    if HAS_BIAS:
        if SHARDED:
            rows_ok = (offs_m >= p0) & (offs_m < LQ)
        else:
            rows_ok = offs_m < LQ
        ts_i = tl.load(ts_base + offs_m, mask=rows_ok, other=0)
        ti_lo, ti_hi = valid_range(ts_i, rows_ok)
        far = tile_distance(m0, n0, BLOCK_M, BLOCK_N)
        x, pos_uniform, time_uniform, t_one = add_tile_bias(
            x, offs_n[:, None], offs_m[None, :], ts_j[:, None], ts_i[None, :], far, tj_lo, tj_hi, ti_lo, ti_hi,
            PosW, TimeW, P, NT, TIME_FN, ASM_GATHER, UNIFORM_BIAS,
        )
    if WITH_DK:
        p, dsilu = silu_and_grad(x, FAST_SILU)
        dp = mma(v, tl.trans(do), None, PRECISION)  # [BLOCK_N, BLOCK_M]
        dx = dp * dsilu
    else:
        p = silu(x, FAST_SILU)
    if MASKED:
        allowed = pair_mask(
            offs_m[None, :], offs_n[:, None], LQ, LK, H, c, w, g,
            CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_PREFIX,
        )
        if SHARDED:
            allowed = allowed & (offs_m >= p0)[None, :]
        if WITH_DV:
            p = tl.where(allowed, p, 0.0)
        if WITH_DK:
            dx = tl.where(allowed, dx, 0.0)
    else:
        allowed = offs_n[:, None] >= 0
    if WITH_DV:
        dv = mma(p.to(do.dtype), do, dv, PRECISION)
    if WITH_DK:
        dx16 = dx.to(q.dtype)
        dk = mma(dx16, q, dk, PRECISION)
        if ATOMIC_DQ:
            dq = mma(tl.trans(dx16), k, None, PRECISION) * (alpha * inv_n)  # [BLOCK_M, Dqk]
            cols = tl.arange(0, BLOCK_DQK)
            ptrs = dq_base + offs_m[:, None] * stride_dqt + cols[None, :]
            if SHARDED:
                rows_ok = (offs_m >= p0) & (offs_m < LQ)
            else:
                rows_ok = offs_m < LQ
            tl.atomic_add(ptrs, dq, mask=rows_ok[:, None] & (cols < DQK)[None, :], sem="relaxed")
        if HAS_BIAS:
            add_bias_grad(
                dx * inv_n, offs_n[:, None], offs_m[None, :], ts_j[:, None], ts_i[None, :], pos_uniform, time_uniform,
                t_one, far, slot, DPosW, DTimeW, P, NT, allowed, TIME_FN, MASKED, UNIFORM_BIAS,
            )
    return dk, dv


@triton.jit(do_not_specialize=["num_n_blocks"])  # varies per batch: one compile
def hstu_bwd_dkdv_kernel(
    Q, K, V, GradOut, GradQ, GradK, GradV, Offsets, NumTargets, Timestamps, PosW, TimeW, DPosW, DTimeW,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    num_heads, num_n_blocks, alpha, inv_max_seq_len,
    contextual_len, max_attn_len, global_prefix_len, num_pos_buckets, num_time_buckets,
    KeyOffsets, QueryStart, SeqLengths, KeyTimestamps,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr, TIME_FN: tl.constexpr,
    NORM_BY_LEN: tl.constexpr, FAST_SILU: tl.constexpr, ASM_GATHER: tl.constexpr, PRECISION: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, NUM_SLOTS: tl.constexpr, WITH_DK: tl.constexpr, WITH_DV: tl.constexpr,
    SHARDED: tl.constexpr, UNIFORM_BIAS: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    if CAUSAL:  # the first key blocks are seen by the most queries: launch them first
        pid_n = tl.program_id(1)
    else:
        pid_n = num_n_blocks - 1 - tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    start = tl.load(Offsets + b).to(tl.int64)
    L = (tl.load(Offsets + b + 1) - start).to(tl.int32)
    n0 = pid_n * BLOCK_N
    if SHARDED:
        # Rows are positions in sequences of up to millions of tokens: 64-bit row offsets.
        stride_qt = tl.cast(stride_qt, tl.int64)
        stride_kt = tl.cast(stride_kt, tl.int64)
        stride_vt = tl.cast(stride_vt, tl.int64)
        stride_dot = tl.cast(stride_dot, tl.int64)
        stride_dqt = tl.cast(stride_dqt, tl.int64)
        stride_dkt = tl.cast(stride_dkt, tl.int64)
        stride_dvt = tl.cast(stride_dvt, tl.int64)
        p0 = tl.load(QueryStart + b).to(tl.int32)
        LQ = p0 + L
        L = tl.load(SeqLengths + b).to(tl.int32)
        k_start = tl.load(KeyOffsets + b).to(tl.int64)
        LK = (tl.load(KeyOffsets + b + 1) - k_start).to(tl.int32)
        q_row0 = start - p0  # the address of position 0 (rows before p0 are never read)
        if n0 >= LK:
            return
    else:
        p0 = 0
        LQ = L
        LK = L
        k_start = start
        q_row0 = start
        if n0 >= L:
            return
    if HAS_TARGETS:
        H = L - tl.load(NumTargets + b).to(tl.int32)
    else:
        H = L
    c = contextual_len
    w = max_attn_len
    g = global_prefix_len
    if NORM_BY_LEN:
        inv_n = 1.0 / L.to(tl.float32)
    else:
        inv_n = inv_max_seq_len
    slot = (tl.program_id(1) * tl.num_programs(0) + pid_bh) % NUM_SLOTS

    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = load_rows(K + k_start * stride_kt + h * stride_kh, offs_n, stride_kt, LK, DQK, BLOCK_DQK, True)
    if WITH_DK:  # do v^T
        v = load_rows(V + k_start * stride_vt + h * stride_vh, offs_n, stride_vt, LK, DV, BLOCK_DV, True)
    else:
        v = k
    q_base = Q + q_row0 * stride_qt + h * stride_qh
    do_base = GradOut + q_row0 * stride_dot + h * stride_doh
    dq_base = GradQ + q_row0 * stride_dqt + h * stride_dqh
    ts_base = Timestamps + q_row0
    if HAS_BIAS:
        if SHARDED:
            ts_j = tl.load(KeyTimestamps + k_start + offs_n, mask=offs_n < LK, other=0)
        else:
            ts_j = tl.load(ts_base + offs_n, mask=offs_n < L, other=0)
        tj_lo, tj_hi = valid_range(ts_j, offs_n < LK)
    else:
        ts_j = offs_n
        tj_lo = 0
        tj_hi = 0
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    lo, full_lo, full_hi, hi = query_ranges(
        n0, LQ, LK, H, c, w, g, p0, BLOCK_M, BLOCK_N, CAUSAL, HAS_CONTEXT, HAS_WINDOW, HAS_PREFIX, SHARDED
    )
    for m0 in range(lo, full_lo, BLOCK_M):
        dk, dv = _dkdv_tile(
            dk, dv, k, v, q_base, do_base, dq_base, stride_qt, stride_dot, stride_dqt, m0, offs_n, ts_j, tj_lo, tj_hi,
            ts_base, PosW, TimeW, DPosW, DTimeW, slot, n0, LQ, LK, H, c, w, g, p0, alpha, inv_n, num_pos_buckets,
            num_time_buckets,
            DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_M, BLOCK_N, True,
            CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_PREFIX, HAS_BIAS, TIME_FN, FAST_SILU, ASM_GATHER,
            PRECISION, ATOMIC_DQ, WITH_DK, WITH_DV, SHARDED, UNIFORM_BIAS,
        )
    for m0 in range(full_lo, full_hi, BLOCK_M):
        dk, dv = _dkdv_tile(
            dk, dv, k, v, q_base, do_base, dq_base, stride_qt, stride_dot, stride_dqt, m0, offs_n, ts_j, tj_lo, tj_hi,
            ts_base, PosW, TimeW, DPosW, DTimeW, slot, n0, LQ, LK, H, c, w, g, p0, alpha, inv_n, num_pos_buckets,
            num_time_buckets,
            DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_M, BLOCK_N, False,
            CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_PREFIX, HAS_BIAS, TIME_FN, FAST_SILU, ASM_GATHER,
            PRECISION, ATOMIC_DQ, WITH_DK, WITH_DV, SHARDED, UNIFORM_BIAS,
        )
    for m0 in range(full_hi, hi, BLOCK_M):
        dk, dv = _dkdv_tile(
            dk, dv, k, v, q_base, do_base, dq_base, stride_qt, stride_dot, stride_dqt, m0, offs_n, ts_j, tj_lo, tj_hi,
            ts_base, PosW, TimeW, DPosW, DTimeW, slot, n0, LQ, LK, H, c, w, g, p0, alpha, inv_n, num_pos_buckets,
            num_time_buckets,
            DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_M, BLOCK_N, True,
            CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_PREFIX, HAS_BIAS, TIME_FN, FAST_SILU, ASM_GATHER,
            PRECISION, ATOMIC_DQ, WITH_DK, WITH_DV, SHARDED, UNIFORM_BIAS,
        )

    row_ok = (offs_n < LK)[:, None]
    cols_qk = tl.arange(0, BLOCK_DQK)
    cols_v = tl.arange(0, BLOCK_DV)
    dk_ptrs = GradK + k_start * stride_dkt + h * stride_dkh + offs_n[:, None] * stride_dkt + cols_qk[None, :]
    dv_ptrs = GradV + k_start * stride_dvt + h * stride_dvh + offs_n[:, None] * stride_dvt + cols_v[None, :]
    if WITH_DK:
        tl.store(dk_ptrs, (dk * (alpha * inv_n)).to(GradK.dtype.element_ty), mask=row_ok & (cols_qk < DQK)[None, :])
    if WITH_DV:
        tl.store(dv_ptrs, (dv * inv_n).to(GradV.dtype.element_ty), mask=row_ok & (cols_v < DV)[None, :])


@triton.jit
def _dq_tile(
    dq, q, do, k_base, v_base, stride_kt, stride_vt, m0, n0, offs_m, ts_i, ti_lo, ti_hi, ts_base, PosW, TimeW,
    LQ, LK, H, c, w, g, alpha, P, NT,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr, TIME_FN: tl.constexpr,
    FAST_SILU: tl.constexpr, ASM_GATHER: tl.constexpr, PRECISION: tl.constexpr, UNIFORM_BIAS: tl.constexpr,
):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = load_rows(k_base, offs_n, stride_kt, LK, DQK, BLOCK_DQK, MASKED)  # [BLOCK_N, Dqk]
    v = load_rows(v_base, offs_n, stride_vt, LK, DV, BLOCK_DV, MASKED)  # [BLOCK_N, Dv]
    x = mma(q, tl.trans(k), None, PRECISION) * alpha  # [BLOCK_M, BLOCK_N]
    if HAS_BIAS:
        ts_j = tl.load(ts_base + offs_n, mask=offs_n < LK, other=0)
        tj_lo, tj_hi = valid_range(ts_j, offs_n < LK)
        x, _, _, _ = add_tile_bias(
            x, offs_m[:, None], offs_n[None, :], ts_i[:, None], ts_j[None, :], tile_distance(m0, n0, BLOCK_M, BLOCK_N),
            ti_lo, ti_hi, tj_lo, tj_hi, PosW, TimeW, P, NT, TIME_FN, ASM_GATHER, UNIFORM_BIAS,
        )
    _, dsilu = silu_and_grad(x, FAST_SILU)
    dp = mma(do, tl.trans(v), None, PRECISION)  # [BLOCK_M, BLOCK_N]
    dx = dp * dsilu
    if MASKED:
        allowed = pair_mask(
            offs_m[:, None], offs_n[None, :], LQ, LK, H, c, w, g,
            CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_PREFIX,
        )
        dx = tl.where(allowed, dx, 0.0)
    return mma(dx.to(k.dtype), k, dq, PRECISION)


@triton.jit(do_not_specialize=["num_m_blocks"])
def hstu_bwd_dq_kernel(
    Q, K, V, GradOut, GradQ, Offsets, NumTargets, Timestamps, PosW, TimeW,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    num_heads, num_m_blocks, alpha, inv_max_seq_len,
    contextual_len, max_attn_len, global_prefix_len, num_pos_buckets, num_time_buckets,
    KeyOffsets, QueryStart, SeqLengths, KeyTimestamps,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr, TIME_FN: tl.constexpr,
    NORM_BY_LEN: tl.constexpr, FAST_SILU: tl.constexpr, ASM_GATHER: tl.constexpr, PRECISION: tl.constexpr,
    SHARDED: tl.constexpr, UNIFORM_BIAS: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = num_m_blocks - 1 - tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    start = tl.load(Offsets + b).to(tl.int64)
    L = (tl.load(Offsets + b + 1) - start).to(tl.int32)
    if SHARDED:
        # Rows are positions in sequences of up to millions of tokens: 64-bit row offsets.
        stride_qt = tl.cast(stride_qt, tl.int64)
        stride_kt = tl.cast(stride_kt, tl.int64)
        stride_vt = tl.cast(stride_vt, tl.int64)
        stride_dot = tl.cast(stride_dot, tl.int64)
        stride_dqt = tl.cast(stride_dqt, tl.int64)
        p0 = tl.load(QueryStart + b).to(tl.int32)
        LQ = p0 + L
        L = tl.load(SeqLengths + b).to(tl.int32)
        k_start = tl.load(KeyOffsets + b).to(tl.int64)
        LK = (tl.load(KeyOffsets + b + 1) - k_start).to(tl.int32)
        q_row0 = start - p0  # the address of position 0 (rows before p0 are never read)
        m0 = p0 // BLOCK_M * BLOCK_M + pid_m * BLOCK_M
        if m0 >= LQ:
            return
    else:
        LQ = L
        LK = L
        k_start = start
        q_row0 = start
        m0 = pid_m * BLOCK_M
        if m0 >= L:
            return
    if HAS_TARGETS:
        H = L - tl.load(NumTargets + b).to(tl.int32)
    else:
        H = L
    c = contextual_len
    w = max_attn_len
    g = global_prefix_len

    offs_m = m0 + tl.arange(0, BLOCK_M)
    if SHARDED:
        q = load_rows_between(Q + q_row0 * stride_qt + h * stride_qh, offs_m, stride_qt, p0, LQ, DQK, BLOCK_DQK)
        do = load_rows_between(GradOut + q_row0 * stride_dot + h * stride_doh, offs_m, stride_dot, p0, LQ, DV, BLOCK_DV)
        k_base = K + k_start * stride_kt + h * stride_kh
        v_base = V + k_start * stride_vt + h * stride_vh
        ts_base = KeyTimestamps + k_start
        rows_ok = (offs_m >= p0) & (offs_m < LQ)
        if HAS_BIAS:
            ts_i = tl.load(Timestamps + q_row0 + offs_m, mask=rows_ok, other=0)
        else:
            ts_i = offs_m
    else:
        q = load_rows(Q + start * stride_qt + h * stride_qh, offs_m, stride_qt, L, DQK, BLOCK_DQK, True)
        do = load_rows(GradOut + start * stride_dot + h * stride_doh, offs_m, stride_dot, L, DV, BLOCK_DV, True)
        k_base = K + start * stride_kt + h * stride_kh
        v_base = V + start * stride_vt + h * stride_vh
        ts_base = Timestamps + start
        rows_ok = offs_m < L
        if HAS_BIAS:
            ts_i = tl.load(ts_base + offs_m, mask=rows_ok, other=0)
        else:
            ts_i = offs_m
    if HAS_BIAS:
        ti_lo, ti_hi = valid_range(ts_i, rows_ok)
    else:
        ti_lo = 0
        ti_hi = 0
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)

    prefix_hi, lo, full_lo, full_hi, hi = key_ranges(
        m0, LQ, LK, H, c, w, g, BLOCK_M, BLOCK_N, CAUSAL, HAS_CONTEXT, HAS_WINDOW, HAS_PREFIX, SHARDED
    )
    if HAS_WINDOW and (HAS_CONTEXT or HAS_PREFIX):
        for n0 in range(0, prefix_hi, BLOCK_N):
            dq = _dq_tile(
                dq, q, do, k_base, v_base, stride_kt, stride_vt, m0, n0, offs_m, ts_i, ti_lo, ti_hi, ts_base, PosW,
                TimeW, LQ, LK, H, c, w, g, alpha, num_pos_buckets, num_time_buckets, DQK, DV, BLOCK_DQK, BLOCK_DV,
                BLOCK_M, BLOCK_N, True, CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_PREFIX, HAS_BIAS,
                TIME_FN, FAST_SILU, ASM_GATHER, PRECISION, UNIFORM_BIAS,
            )
    for n0 in range(lo, full_lo, BLOCK_N):
        dq = _dq_tile(
            dq, q, do, k_base, v_base, stride_kt, stride_vt, m0, n0, offs_m, ts_i, ti_lo, ti_hi, ts_base, PosW,
            TimeW, LQ, LK, H, c, w, g, alpha, num_pos_buckets, num_time_buckets, DQK, DV, BLOCK_DQK, BLOCK_DV,
            BLOCK_M, BLOCK_N, True, CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_PREFIX, HAS_BIAS,
            TIME_FN, FAST_SILU, ASM_GATHER, PRECISION, UNIFORM_BIAS,
        )
    for n0 in range(full_lo, full_hi, BLOCK_N):
        dq = _dq_tile(
            dq, q, do, k_base, v_base, stride_kt, stride_vt, m0, n0, offs_m, ts_i, ti_lo, ti_hi, ts_base, PosW,
            TimeW, LQ, LK, H, c, w, g, alpha, num_pos_buckets, num_time_buckets, DQK, DV, BLOCK_DQK, BLOCK_DV,
            BLOCK_M, BLOCK_N, False, CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_PREFIX, HAS_BIAS,
            TIME_FN, FAST_SILU, ASM_GATHER, PRECISION, UNIFORM_BIAS,
        )
    for n0 in range(full_hi, hi, BLOCK_N):
        dq = _dq_tile(
            dq, q, do, k_base, v_base, stride_kt, stride_vt, m0, n0, offs_m, ts_i, ti_lo, ti_hi, ts_base, PosW,
            TimeW, LQ, LK, H, c, w, g, alpha, num_pos_buckets, num_time_buckets, DQK, DV, BLOCK_DQK, BLOCK_DV,
            BLOCK_M, BLOCK_N, True, CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_PREFIX, HAS_BIAS,
            TIME_FN, FAST_SILU, ASM_GATHER, PRECISION, UNIFORM_BIAS,
        )

    if NORM_BY_LEN:
        scale = alpha / L.to(tl.float32)
    else:
        scale = alpha * inv_max_seq_len
    cols = tl.arange(0, BLOCK_DQK)
    ptrs = GradQ + q_row0 * stride_dqt + h * stride_dqh + offs_m[:, None] * stride_dqt + cols[None, :]
    tl.store(ptrs, (dq * scale).to(GradQ.dtype.element_ty), mask=rows_ok[:, None] & (cols < DQK)[None, :])
