"""Forward kernel of jagged HSTU attention.

One program per (sequence, head, query block of BLOCK_M rows); programs of the last query
blocks, which see the most keys under a causal mask, are launched first. The program keeps
its queries and an fp32 accumulator on chip and streams key/value blocks:

    x = alpha * q k^T + bias        [BLOCK_M, BLOCK_N], fp32
    acc += (SiLU(x) * mask) v       fp32 accumulation, 16-bit operands
    out = acc / n

No softmax means no running maximum and no rescaling: the normaliser n is applied once.
The relative bias of a tile: :mod:`megatron_gr.ops.triton.hstu_bias_tiles`.

``SHARDED`` (context parallelism, :class:`~megatron_gr.ops.key_layout.KeyLayout`): program b
holds the query segment b, positions ``[p0, p0 + n)`` of a sequence of L tokens, and streams
that segment's own keys, positions ``[0, LK)``; query blocks stay aligned to multiples of
BLOCK_M from position 0 (one more block than the longest segment needs).
"""

from __future__ import annotations

import triton
import triton.language as tl

from megatron_gr.ops.triton.hstu_bias_tiles import add_tile_bias, tile_distance, valid_range
from megatron_gr.ops.triton.hstu_tiles import key_ranges, load_rows, load_rows_between, mma, pair_mask, silu


@triton.jit
def _fwd_tile(
    acc, q, k_base, v_base, stride_kt, stride_vt, m0, n0, offs_m, ts_i, ti_lo, ti_hi, ts_base, PosW, TimeW,
    LQ, LK, H, c, w, g, alpha, P, NT,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr, TIME_FN: tl.constexpr,
    FAST_SILU: tl.constexpr, ASM_GATHER: tl.constexpr, PRECISION: tl.constexpr, UNIFORM_BIAS: tl.constexpr,
):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = load_rows(k_base, offs_n, stride_kt, LK, DQK, BLOCK_DQK, MASKED)  # [BLOCK_N, Dqk]
    x = mma(q, tl.trans(k), None, PRECISION) * alpha  # [BLOCK_M, BLOCK_N]
    if HAS_BIAS:
        ts_j = tl.load(ts_base + offs_n, mask=offs_n < LK, other=0)
        tj_lo, tj_hi = valid_range(ts_j, offs_n < LK)
        x, _, _, _ = add_tile_bias(
            x, offs_m[:, None], offs_n[None, :], ts_i[:, None], ts_j[None, :], tile_distance(m0, n0, BLOCK_M, BLOCK_N),
            ti_lo, ti_hi, tj_lo, tj_hi, PosW, TimeW, P, NT, TIME_FN, ASM_GATHER, UNIFORM_BIAS,
        )
    p = silu(x, FAST_SILU)
    if MASKED:
        allowed = pair_mask(
            offs_m[:, None], offs_n[None, :], LQ, LK, H, c, w, g,
            CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_PREFIX,
        )
        p = tl.where(allowed, p, 0.0)
    v = load_rows(v_base, offs_n, stride_vt, LK, DV, BLOCK_DV, MASKED)  # [BLOCK_N, Dv]
    return mma(p.to(v.dtype), v, acc, PRECISION)


@triton.jit(do_not_specialize=["num_m_blocks"])  # varies per batch: one compile
def hstu_fwd_kernel(
    Q, K, V, Out, Offsets, NumTargets, Timestamps, PosW, TimeW,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
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
    pid_m = num_m_blocks - 1 - tl.program_id(1)  # heaviest (last) query blocks first
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    start = tl.load(Offsets + b).to(tl.int64)
    L = (tl.load(Offsets + b + 1) - start).to(tl.int32)
    if SHARDED:
        # Rows are positions in sequences of up to millions of tokens: 64-bit row offsets.
        stride_qt = tl.cast(stride_qt, tl.int64)
        stride_kt = tl.cast(stride_kt, tl.int64)
        stride_vt = tl.cast(stride_vt, tl.int64)
        stride_ot = tl.cast(stride_ot, tl.int64)
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
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    prefix_hi, lo, full_lo, full_hi, hi = key_ranges(
        m0, LQ, LK, H, c, w, g, BLOCK_M, BLOCK_N, CAUSAL, HAS_CONTEXT, HAS_WINDOW, HAS_PREFIX, SHARDED
    )
    if HAS_WINDOW and (HAS_CONTEXT or HAS_PREFIX):
        for n0 in range(0, prefix_hi, BLOCK_N):
            acc = _fwd_tile(
                acc, q, k_base, v_base, stride_kt, stride_vt, m0, n0, offs_m, ts_i, ti_lo, ti_hi, ts_base, PosW,
                TimeW, LQ, LK, H, c, w, g, alpha, num_pos_buckets, num_time_buckets, DQK, DV, BLOCK_DQK, BLOCK_DV,
                BLOCK_M, BLOCK_N, True, CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_PREFIX, HAS_BIAS,
                TIME_FN, FAST_SILU, ASM_GATHER, PRECISION, UNIFORM_BIAS,
            )
    for n0 in range(lo, full_lo, BLOCK_N):
        acc = _fwd_tile(
            acc, q, k_base, v_base, stride_kt, stride_vt, m0, n0, offs_m, ts_i, ti_lo, ti_hi, ts_base, PosW,
            TimeW, LQ, LK, H, c, w, g, alpha, num_pos_buckets, num_time_buckets, DQK, DV, BLOCK_DQK, BLOCK_DV,
            BLOCK_M, BLOCK_N, True, CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_PREFIX, HAS_BIAS,
            TIME_FN, FAST_SILU, ASM_GATHER, PRECISION, UNIFORM_BIAS,
        )
    for n0 in range(full_lo, full_hi, BLOCK_N):
        acc = _fwd_tile(
            acc, q, k_base, v_base, stride_kt, stride_vt, m0, n0, offs_m, ts_i, ti_lo, ti_hi, ts_base, PosW,
            TimeW, LQ, LK, H, c, w, g, alpha, num_pos_buckets, num_time_buckets, DQK, DV, BLOCK_DQK, BLOCK_DV,
            BLOCK_M, BLOCK_N, False, CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_PREFIX, HAS_BIAS,
            TIME_FN, FAST_SILU, ASM_GATHER, PRECISION, UNIFORM_BIAS,
        )
    for n0 in range(full_hi, hi, BLOCK_N):
        acc = _fwd_tile(
            acc, q, k_base, v_base, stride_kt, stride_vt, m0, n0, offs_m, ts_i, ti_lo, ti_hi, ts_base, PosW,
            TimeW, LQ, LK, H, c, w, g, alpha, num_pos_buckets, num_time_buckets, DQK, DV, BLOCK_DQK, BLOCK_DV,
            BLOCK_M, BLOCK_N, True, CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_PREFIX, HAS_BIAS,
            TIME_FN, FAST_SILU, ASM_GATHER, PRECISION, UNIFORM_BIAS,
        )

    if NORM_BY_LEN:
        acc = acc / L.to(tl.float32)
    else:
        acc = acc * inv_max_seq_len
    offs_d = tl.arange(0, BLOCK_DV)
    out_ptrs = Out + q_row0 * stride_ot + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=rows_ok[:, None] & (offs_d < DV)[None, :])
