"""Device functions shared by the HSTU attention kernels: the mask of a tile (the rules of
:mod:`megatron_gr.ops.attention_mask`, evaluated per pair), the key/query ranges a block
must visit, the relative bias of a tile, SiLU and its derivative.

Ranges. A query block [m0, m0 + BLOCK_M) visits key blocks in up to four loops: a prefix
(contextual or global-prefix keys left of a local window), then the window split into a
masked head, a run of *full* tiles (every pair allowed: no mask is evaluated) and a masked
tail. Ranges may over-cover (the masked loops evaluate the exact rules) but a full tile must
really be full; the kernel tests sweep masks and lengths with small blocks so that every
loop is exercised.

Limits. Positions count from the start of the sequence. ``LQ`` bounds the query rows and
``LK`` the keys; both are the sequence length L unless the queries are a window of their
sequence (``SHARDED``, :class:`~megatron_gr.ops.key_layout.KeyLayout`): rows ``[p0, LQ)``
against keys ``[0, LK)`` of a sequence of L tokens. Blocks stay aligned to multiples of the
block size from position 0, so a window's first block may start before ``p0``: its rows
below ``p0`` are loaded as zeros and never stored, and no *full* tile holds them.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def silu(x, FAST: tl.constexpr):
    """``x * sigmoid(x)``. FAST: with h = x / 2, SiLU(x) = h + h * tanh(h), one MUFU op and
    one FMA instead of exp, reciprocal and three more (relative error ~1e-3; 16-bit inputs)."""
    if FAST:
        h = 0.5 * x
        return h + h * _tanh(h)
    else:
        return x / (1.0 + tl.exp(-x))


@triton.jit
def silu_and_grad(x, FAST: tl.constexpr):
    """``(SiLU(x), SiLU'(x))`` with SiLU'(x) = sigmoid(x) (1 + x (1 - sigmoid(x)))."""
    if FAST:
        h = 0.5 * x
        t = _tanh(h)
        sig = 0.5 + 0.5 * t
        return h + h * t, sig + h * (1.0 - t * t) * 0.5
    else:
        sig = 1.0 / (1.0 + tl.exp(-x))
        return x * sig, sig * (1.0 + x * (1.0 - sig))


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """``a @ b (+ acc)`` accumulated in fp32. ``PRECISION`` is ``tf32`` (ignored for 16-bit
    operands), ``ieee`` (fp32 operands, exact products) or ``upcast``: 16-bit operands
    converted to fp32 first (exact), because the Triton 3.6 interpreter's bf16 dot returns
    garbage; used for CPU tests only."""
    if PRECISION == "upcast":
        if acc is None:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        if acc is None:
            return tl.dot(a, b, input_precision=PRECISION)
        else:
            return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def load_rows(base, rows, stride, limit, D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """``[len(rows), BLOCK_D]`` rows of a [tokens, D] slab (row stride ``stride``); rows at or
    past ``limit`` and columns past D read as 0."""
    cols = tl.arange(0, BLOCK_D)
    ptrs = base + rows[:, None] * stride + cols[None, :]
    if MASK_ROWS:
        if BLOCK_D == D:
            return tl.load(ptrs, mask=(rows < limit)[:, None], other=0.0)
        else:
            return tl.load(ptrs, mask=(rows < limit)[:, None] & (cols < D)[None, :], other=0.0)
    else:
        if BLOCK_D == D:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=(cols < D)[None, :], other=0.0)


@triton.jit
def load_rows_between(base, rows, stride, lo, hi, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """``load_rows`` of the rows in ``[lo, hi)`` (others read as 0): a window's first block
    may start before its first row, whose address lies before the window's data."""
    cols = tl.arange(0, BLOCK_D)
    ptrs = base + rows[:, None] * stride + cols[None, :]
    ok = (rows >= lo) & (rows < hi)
    if BLOCK_D == D:
        return tl.load(ptrs, mask=ok[:, None], other=0.0)
    else:
        return tl.load(ptrs, mask=ok[:, None] & (cols < D)[None, :], other=0.0)


@triton.jit
def pair_mask(
    i, j, LQ, LK, H, c, w, g,
    CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_PREFIX: tl.constexpr,
):
    """The rules of ``attention_mask`` for query positions ``i`` and key positions ``j``
    (broadcastable int tensors) of a sequence with history H; rows at or past LQ and keys at
    or past LK are out of range."""
    in_range = (i < LQ) & (j < LK)
    if HAS_TARGETS:
        pi = tl.minimum(i, H)
        pj = tl.minimum(j, H)
    else:
        pi = i
        pj = j
    allowed = in_range
    if CAUSAL:
        allowed = allowed & (pj <= pi)
    if HAS_WINDOW:
        if CAUSAL:
            local = (pi - pj) <= w
        else:
            local = tl.abs(pi - pj) <= w
        if HAS_PREFIX:
            local = local | (j < g)
        allowed = allowed & local
    if HAS_TARGETS:
        allowed = tl.where(j >= H, i == j, allowed)
    if HAS_CONTEXT:
        allowed = allowed | (j < c)
    return allowed & in_range


@triton.jit
def key_ranges(
    m0, LQ, LK, H, c, w, g, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PREFIX: tl.constexpr,
    SHARDED: tl.constexpr,
):
    """Key loops of query block m0: ``(prefix_hi, lo, full_lo, full_hi, hi)``. Loops:
    masked [0, prefix_hi), masked [lo, full_lo), full [full_lo, full_hi), masked [full_hi, hi).
    Rows of the block before a window's first row only make the ranges wider (they are
    never stored)."""
    i_last = tl.minimum(m0 + BLOCK_M, LQ) - 1
    p_first = tl.minimum(m0, H)
    p_last = tl.minimum(i_last, H)
    if CAUSAL:
        hi = i_last + 1
    else:
        if HAS_WINDOW:
            hi = tl.maximum(p_last + w + 1, i_last + 1)
            if HAS_PREFIX:
                hi = tl.maximum(hi, g)
        else:
            hi = LK
    if HAS_CONTEXT:
        hi = tl.maximum(hi, c)
    hi = tl.minimum(hi, LK)
    if HAS_WINDOW:
        lo = tl.maximum(p_first - w, 0) // BLOCK_N * BLOCK_N
        prefix_hi = lo * 0
        if HAS_CONTEXT:
            prefix_hi = tl.maximum(prefix_hi, c)
        if HAS_PREFIX:
            prefix_hi = tl.maximum(prefix_hi, g)
        prefix_hi = tl.minimum(prefix_hi, lo)
        full_lo = (tl.maximum(p_last - w, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        full_lo = tl.maximum(full_lo, lo)
    else:
        lo = hi * 0
        prefix_hi = lo
        full_lo = lo
    # Full tiles: every row valid, every column a history key every row may see.
    col_hi = H
    if SHARDED:
        col_hi = tl.minimum(col_hi, LK)
    if CAUSAL:
        col_hi = tl.minimum(col_hi, p_first + 1)
    elif HAS_WINDOW:
        col_hi = tl.minimum(col_hi, p_first + w + 1)
    full_lo = tl.minimum(full_lo, (hi + BLOCK_N - 1) // BLOCK_N * BLOCK_N)
    full_hi = tl.maximum(col_hi // BLOCK_N * BLOCK_N, full_lo)
    full_hi = tl.where(m0 + BLOCK_M <= LQ, full_hi, full_lo)
    return prefix_hi, lo, full_lo, full_hi, hi


@triton.jit
def query_ranges(
    n0, LQ, LK, H, c, w, g, p0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PREFIX: tl.constexpr,
    SHARDED: tl.constexpr,
):
    """Query loops of key block n0: ``(lo, full_lo, full_hi, hi)``. Loops: masked
    [lo, full_lo), full [full_lo, full_hi), masked [full_hi, hi). ``SHARDED``: only rows
    from ``p0`` on exist; full tiles start at the first block boundary at or after it."""
    j_last = tl.minimum(n0 + BLOCK_N, LK) - 1
    if CAUSAL:
        lo = n0
    else:
        if HAS_WINDOW:
            lo = tl.maximum(n0 - w, 0)
        else:
            lo = n0 * 0
    if HAS_CONTEXT:
        lo = tl.where(n0 < c, 0, lo)
    if HAS_PREFIX:
        if not CAUSAL:
            lo = tl.where(n0 < g, 0, lo)
    lo = lo // BLOCK_M * BLOCK_M
    if SHARDED:
        lo = tl.maximum(lo, p0 // BLOCK_M * BLOCK_M)
    if HAS_WINDOW:
        hi = tl.where(j_last + w >= H, LQ, j_last + w + 1)
        if HAS_CONTEXT:
            hi = tl.where(n0 < c, LQ, hi)
        if HAS_PREFIX:
            hi = tl.where(n0 < g, LQ, hi)
        hi = tl.minimum(hi, LQ)
    else:
        hi = LQ + n0 * 0
    # Full tiles: every column a valid history key, every row valid and allowed to see it.
    if CAUSAL:
        full_lo = (j_last + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    elif HAS_WINDOW:
        full_lo = (tl.maximum(j_last - w, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    else:
        full_lo = lo
    full_lo = tl.minimum(tl.maximum(full_lo, lo), (hi + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
    if SHARDED:
        full_lo = tl.maximum(full_lo, (p0 + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
    if HAS_WINDOW:
        rows_hi = tl.where(n0 + w >= H, LQ, tl.minimum(n0 + w + 1, LQ))
    else:
        rows_hi = LQ + n0 * 0
    full_hi = tl.maximum(rows_hi // BLOCK_M * BLOCK_M, full_lo)
    if SHARDED:
        full_hi = tl.where(n0 + BLOCK_N <= tl.minimum(H, LK), full_hi, full_lo)
    else:
        full_hi = tl.where(n0 + BLOCK_N <= H, full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def gather(table, idx, ASM: tl.constexpr):
    """``table[idx]`` for an fp32 table and in-range int indices. ASM (compiled kernels):
    one ``ld.global.nc.f32`` per element, which Triton's software pipeliner leaves alone.
    Pipelined, every gather of a [BLOCK_N, BLOCK_M] tile was staged in shared memory (16 KiB
    per table at 128x32), which pushed the D = 256 key-block kernels with relative bias past
    the 227 KiB a program may use on an H100 (232 KiB fused, 228 KiB split dk). The tables
    are tiny and stay in cache. The interpreter cannot run assembly: a plain load there."""
    if ASM:
        addr = (table + idx).to(tl.int64)
        return tl.inline_asm_elementwise(
            "ld.global.nc.f32 $0, [$1];", "=f,l", [addr], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.load(table + idx)


@triton.jit
def time_bucket(gap, NT, TIME_FN: tl.constexpr):
    """``bucketize_time_gaps`` for int64 gaps >= 0. ``sqrt`` and ``log`` are exact: a float
    estimate corrected with integer arithmetic (float32 alone misplaces gaps next to a
    bucket boundary); ``hstu_log`` is computed in float64, as the reference does."""
    if TIME_FN == 0:  # floor(sqrt(gap))
        capped = tl.minimum(gap, NT.to(tl.int64) * NT).to(tl.int32)
        r = tl.sqrt(capped.to(tl.float32)).to(tl.int32)
        r = tl.where(r * r > capped, r - 1, r)
        r = tl.where((r + 1) * (r + 1) <= capped, r + 1, r)
    elif TIME_FN == 1:  # floor(log2(gap + 1))
        x = gap + 1
        r = tl.log2(x.to(tl.float32)).to(tl.int32)
        r = tl.minimum(tl.maximum(r, 0), 62)
        one = tl.full(r.shape, 1, tl.int64)
        r = tl.where((one << r.to(tl.int64)) > x, r - 1, r)
        r = tl.where((one << (r + 1).to(tl.int64)) <= x, r + 1, r)
    else:  # floor(ln(max(gap, 1)) * 1000 / 301) in float64, the PyTorch reference's operations
        r = (tl.log(tl.maximum(gap, 1).to(tl.float64)) * 1000.0 / 301.0).to(tl.int32)
    return tl.minimum(r, NT - 1)


@triton.jit
def bias_buckets(i, j, ts_i, ts_j, P, NT, TIME_FN: tl.constexpr):
    """Position and time bucket ids of the pairs (i, j), broadcast like ``i`` and ``j``."""
    pos = tl.minimum(tl.abs(i - j), P - 1)
    tb = time_bucket(tl.abs(ts_i - ts_j), NT, TIME_FN)
    return pos, tb
