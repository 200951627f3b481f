"""Triton kernels of the fused mHC merge pairs (:mod:`megatron_gr.ops.triton.mhc_merge_pre`):
a sublayer's merge ``x' = h_res x + h_post ⊗ dropout(y + b)`` with what reads ``x'`` next.

- :func:`merge_fwd_fused`: one walk over a token tile's channels writes x' once and, with
  MAPS, accumulates the next sublayer's mappings of it (sums of squares and the projection
  ``P x'`` on tensor cores); with CONTRACT it writes the mean of the n merged streams
  instead (the block's last merge).
- :func:`pre_gates`: ``dh_pre = x' . du`` per stream from one walk over the streams, then
  the gate math; with MERGE, x' is recomputed from the merge's inputs (rounded to the
  streams' dtype as the forward stored it) instead of read.
- :func:`merge_bwd_fused`: the merge's backward from the gradient ``G`` of each merged
  stream, which it builds in registers: the stream gradient from downstream plus, with PRE,
  the pre op's ``g P - coef x' + h_pre ⊗ du`` with the pre op's own products (and its
  projection gradient ``gᵀ x'``);
  with CONTRACT, the mean's gradient. So x' and G never reach memory.

Every kernel takes the streams as X ``[T, S, C]``: S = n streams, or S = 1, the block input
standing for its n copies (the block's first merge: the expansion is folded in, see
:func:`megatron_gr.ops.triton.mhc_tiles.streams_of`). The merge's dropout is drawn in one
place, :func:`sublayer_update`: the keyed mask of the plain merge
(:mod:`megatron_gr.ops.triton.keyed_dropout`), hashed from the token keys ``Keys`` and the
site's stream words in every kernel that needs it, never stored. The words are the
arguments ``s0, s1, s2``, or with ``DEVICE_WORDS`` the ``[3]`` int64 tensor ``Words``
(what a replayed CUDA graph reads), as the plain merge takes them. The kernels specialise
neither on the words nor on the token count (a new step, site or batch reuses the
compiled kernel).
"""

from __future__ import annotations

import triton
import triton.language as tl

from megatron_gr.ops.triton.keyed_dropout import column_hashes, keep_elements, row_hashes, stream_words_of
from megatron_gr.ops.triton.mhc_mappings import dot_acc, gates_tile, map_outputs
from megatron_gr.ops.triton.mhc_merge import _bias_row, _dropped, _update
from megatron_gr.ops.triton.mhc_tiles import map_column, merged_stream, stream_tiles, streams_of


# per batch and step: the token count and the keyed dropout's scalars, not specialised on
_UNSPECIALIZED = ["num_tokens", "feature_offset", "s0", "s1", "s2", "threshold"]


@triton.jit
def token_hashes(Keys, rows, live, s0, s1, DROPOUT: tl.constexpr):
    """The keyed mask's ``[BLOCK_T]`` hashes of the tokens ``rows`` (one per token tile,
    kept across its channel chunks); a placeholder without dropout."""
    if DROPOUT:
        return row_hashes(Keys, rows, live, s0, s1)
    return rows.to(tl.uint32)


@triton.jit
def channel_hashes(c, feature_offset, s2, DROPOUT: tl.constexpr):
    """The keyed mask's ``[BLOCK_C]`` hashes of the channels ``c`` (global index
    ``feature_offset + c``); a placeholder without dropout."""
    if DROPOUT:
        return column_hashes(feature_offset + c, s2)
    return c.to(tl.uint32)


@triton.jit
def sublayer_update(Y, Bias, rows, c, mask, C, p, rows_hash, columns_hash, threshold, HAS_BIAS: tl.constexpr,
                    DROPOUT: tl.constexpr):
    """``dropout(y + bias)`` of a ``[BLOCK_T, BLOCK_C]`` tile (float32) and its keep mask: the
    plain merge's keyed mask of these tokens and channels (from :func:`token_hashes` and
    :func:`channel_hashes`), and the only place the fused kernels apply it."""
    keep = mask
    if DROPOUT:
        keep = keep_elements(rows_hash, columns_hash, threshold)
    return _dropped(_update(Y, _bias_row(Bias, c, C, HAS_BIAS), rows, c, mask, C), keep, p, DROPOUT), keep


@triton.jit
def _project(q, PHi, PLo, k, k_live, w, W, K, acc, SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + q Pᵀ[k, :]`` for a ``[BLOCK_T, BLOCK_C]`` tile q of the values k of P ``[W, K]``
    (bf16 q: P as two bf16 halves, exact products; else tf32x3)."""
    offsets = w[None, :] * K + k[:, None]  # [BLOCK_C, WP]
    p_mask = k_live[:, None] & (w < W)[None, :]
    if SPLIT:
        acc = dot_acc(q, tl.load(PHi + offsets, mask=p_mask, other=0.0), acc, UPCAST, "tf32x3")
        acc = dot_acc(q, tl.load(PLo + offsets, mask=p_mask, other=0.0), acc, UPCAST, "tf32x3")
    else:
        acc = dot_acc(q.to(tl.float32), tl.load(PHi + offsets, mask=p_mask, other=0.0).to(tl.float32), acc, UPCAST,
                      "tf32x3")
    return acc


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def merge_fwd_fused(X, HRes, HPost, Y, Bias, Keys, Words, Out, PHi, PLo, Alpha, MapBias, Pre, Post, ResLogits, Logits, InvRms,
                    num_tokens, C, p, feature_offset, s0, s1, s2, threshold, eps, n: tl.constexpr, S: tl.constexpr,
                    W: tl.constexpr, WP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, MAPS: tl.constexpr, CONTRACT: tl.constexpr,
                    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, DEVICE_WORDS: tl.constexpr, SPLIT: tl.constexpr,
                    UPCAST: tl.constexpr):
    """``BLOCK_T`` tokens, all their channels: x and y read once, x' ``[T, n, C]`` (or its
    mean ``[T, C]`` with CONTRACT) written once; with MAPS, the mappings of x' as
    :func:`megatron_gr.ops.triton.mhc_mappings._mappings_fwd` computes them from memory,
    here from the rounded tiles in registers."""
    s0, s1, s2 = stream_words_of(Words, s0, s1, s2, DEVICE_WORDS)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = tokens.to(tl.int64)
    live = tokens < num_tokens
    K = n * C
    w = tl.arange(0, WP)
    acc = tl.zeros([BLOCK_T, WP], dtype=tl.float32)
    squares = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)  # reduced over the channels once, after the loop
    rows_hash = token_hashes(Keys, rows, live, s0, s1, DROPOUT)
    for start in range(0, C, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        c_live = c < C
        mask = live[:, None] & c_live[None, :]
        # the update (and its mask's hashes) before the stream tiles load: fewer live registers
        u, _ = sublayer_update(Y, Bias, rows, c, mask, C, p, rows_hash, channel_hashes(c, feature_offset, s2, DROPOUT),
                               threshold, HAS_BIAS, DROPOUT)
        x = streams_of(X, rows, c, mask, C, n, S)
        total = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for i in tl.static_range(n):
            merged = merged_stream(x, u, HRes, HPost, rows, live, i, n)
            if CONTRACT:
                total += merged
            else:
                q = merged.to(Out.dtype.element_ty)
                tl.store(Out + rows[:, None] * K + i * C + c[None, :], q, mask=mask)
                if MAPS:
                    qf = q.to(tl.float32)
                    squares += qf * qf
                    acc = _project(q, PHi, PLo, i * C + c, c_live, w, W, K, acc, SPLIT, UPCAST)
        if CONTRACT:
            tl.store(Out + rows[:, None] * C + c[None, :], (total / n).to(Out.dtype.element_ty), mask=mask)
    if MAPS:
        map_outputs(acc, tl.sum(squares, axis=1), K, eps, rows, live, Alpha, MapBias, Pre, Post, ResLogits, Logits,
                    InvRms, n, W, WP)


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def pre_gates(X, HRes, HPost, Y, Bias, Keys, Words, DU, DPost, DRes, Logits, InvRms, Alpha, MapBias, GHi, GLo, Coef,
              DBiasPart, DAlphaPart, num_tokens, C, p, feature_offset, s0, s1, s2, threshold, n: tl.constexpr,
              S: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
              MERGE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, DEVICE_WORDS: tl.constexpr,
              SPLIT: tl.constexpr):
    """The pre op's gates for ``BLOCK_T`` tokens: ``dh_pre[t, i] = x'_i . du`` from one walk
    over their streams and ``du`` (products per stream in registers, reduced over the
    channels once), then :func:`gates_tile`. The streams x' are X itself, or with MERGE the
    merge of X, y (the fused forward's x', recomputed). Without MERGE and S = 1 (the block
    input standing for n copies) every stream's product is the one ``x . du``, and the RMS
    coefficient is per value of that one copy (``K = C``)."""
    s0, s1, s2 = stream_words_of(Words, s0, s1, s2, DEVICE_WORDS)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = tokens.to(tl.int64)
    live = tokens < num_tokens
    products = ()
    for i in tl.static_range(n):
        products = products + (tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32),)
    rows_hash = token_hashes(Keys, rows, live, s0, s1, DROPOUT and MERGE)
    for start in range(0, C, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        mask = live[:, None] & (c < C)[None, :]
        du = tl.load(DU + rows[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        summed = ()
        if MERGE:
            x = streams_of(X, rows, c, mask, C, n, S)
            u, _ = sublayer_update(Y, Bias, rows, c, mask, C, p, rows_hash,
                                   channel_hashes(c, feature_offset, s2, DROPOUT), threshold, HAS_BIAS, DROPOUT)
            for i in tl.static_range(n):
                q = merged_stream(x, u, HRes, HPost, rows, live, i, n).to(X.dtype.element_ty).to(tl.float32)
                summed = summed + (products[i] + q * du,)
        else:
            x = streams_of(X, rows, c, mask, C, n, S)
            for i in tl.static_range(n):
                if S == 1 and i > 0:
                    summed = summed + (products[i],)  # the copies share stream 0's product
                else:
                    summed = summed + (products[i] + x[i] * du,)
        products = summed
    col = tl.arange(0, WP)[None, :]
    d_pre = tl.zeros([BLOCK_T, WP], dtype=tl.float32)
    for i in tl.static_range(n):
        if S == 1 and not MERGE:
            d_pre = tl.where(col == i, tl.sum(products[0], axis=1, keep_dims=True), d_pre)
        else:
            d_pre = tl.where(col == i, tl.sum(products[i], axis=1, keep_dims=True), d_pre)
    K = C * (n if MERGE else S)
    gates_tile(d_pre, DPost, DRes, Logits, InvRms, Alpha, MapBias, GHi, GLo, Coef, DBiasPart, DAlphaPart, num_tokens,
               K, n, W, WP, BLOCK_T, SPLIT)


@triton.jit
def _stream_grads(Grad, rows, c, mask, C, n: tl.constexpr, CONTRACT: tl.constexpr, HAS_GRAD: tl.constexpr):
    """The gradient of each merged stream from downstream as n tiles: ``Grad`` ``[T, n, C]``,
    or with CONTRACT the mean's gradient ``[T, C]`` over n; zeros without HAS_GRAD."""
    if CONTRACT:
        g = tl.load(Grad + rows[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32) / n
        grads = ()
        for i in tl.static_range(n):
            grads = grads + (g,)
    elif HAS_GRAD:
        grads = stream_tiles(Grad, rows[:, None] * (n * C) + c[None, :], mask, C, n)
    else:
        grads = ()
        for i in tl.static_range(n):
            grads = grads + (tl.zeros(mask.shape, dtype=tl.float32),)
    return grads


@triton.jit
def _with_pre_terms(grads, dp, x, u, HRes, HPost, DU, Pre, GHi, GLo, Coef, p_tiles, rows, tokens, live, c, mask, C,
                    w, WP: tl.constexpr, n: tl.constexpr, out_dtype: tl.constexpr, SPLIT: tl.constexpr,
                    UPCAST: tl.constexpr):
    """The pre op's part of each merged stream's gradient, ``g P - coef x' + h_pre ⊗ du``
    (g: the rows of ``GHi`` ``[T, WP]``; ``p_tiles``: P's ``[WP, BLOCK_C]`` tile of each
    stream), added to ``grads``, and ``gᵀ x'`` added to the
    projection-gradient tiles ``dp`` (``[WP, BLOCK_C]`` per stream). x' is recomputed and
    rounded as the forward stored it. The products are the pre op's own
    (:func:`megatron_gr.ops.triton.mhc_mappings._mappings_bwd_x`): bf16 streams take
    ``g_hi P_hi`` for the stream gradient (as the separate pre op's dx, ~2e-3 relative) and
    ``gᵀ x' = (g_hi + g_lo)ᵀ x'`` exactly; other streams tf32x3."""
    du = tl.load(DU + rows[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
    coef = tl.load(Coef + tokens, mask=live, other=0.0)[:, None]
    g_rows = tl.load(GHi + rows[:, None] * WP + w[None, :], mask=live[:, None], other=0.0)  # [BLOCK_T, WP]
    g_cols = tl.load(GHi + rows[None, :] * WP + w[:, None], mask=live[None, :], other=0.0)  # [WP, BLOCK_T]
    if SPLIT:
        g_cols_lo = tl.load(GLo + rows[None, :] * WP + w[:, None], mask=live[None, :], other=0.0)
    new_grads = ()
    new_dp = ()
    for i in tl.static_range(n):
        q = merged_stream(x, u, HRes, HPost, rows, live, i, n).to(out_dtype)
        qf = q.to(tl.float32)
        gp = dot_acc(g_rows, p_tiles[i], tl.zeros(mask.shape, dtype=tl.float32), UPCAST, "tf32x3")
        if SPLIT:
            dp_i = dot_acc(g_cols, q, dp[i], UPCAST, "tf32x3")
            dp_i = dot_acc(g_cols_lo, q, dp_i, UPCAST, "tf32x3")
        else:
            dp_i = dot_acc(g_cols, qf, dp[i], UPCAST, "tf32x3")
        h_pre = map_column(Pre, rows * n + i, live)
        new_grads = new_grads + (grads[i] + gp - coef * qf + h_pre * du,)
        new_dp = new_dp + (dp_i,)
    return new_grads, new_dp


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def merge_bwd_fused(X, HRes, HPost, Y, Bias, Keys, Words, Grad, DU, Pre, GHi, GLo, Coef, P, DX, DY, DMapPart,
                    DBiasPart, DPPart, num_tokens, C, p, feature_offset, s0, s1, s2, threshold, n: tl.constexpr,
                    S: tl.constexpr, MP: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_C: tl.constexpr, PRE: tl.constexpr, CONTRACT: tl.constexpr, HAS_GRAD: tl.constexpr,
                    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, DEVICE_WORDS: tl.constexpr, SPLIT: tl.constexpr,
                    UPCAST: tl.constexpr):
    """One channel chunk of a range of token tiles (as the plain merge's backward): each tile
    reads x, y and the gradients once and writes dx and dy once. Per token the chunk's
    ``G_i . x_j`` (H_res) and ``G_i . u`` (H_post) sums go to one row of ``MP >= n² + n``
    floats; per program the bias gradient and, with PRE, ``gᵀ x'`` ``[W, n C]`` are summed
    over its tiles and stored once."""
    s0, s1, s2 = stream_words_of(Words, s0, s1, s2, DEVICE_WORDS)
    chunk = tl.program_id(1)
    c = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
    c_live = c < C
    chunk_start = chunk.to(tl.int64) * num_tokens  # first token row of this chunk's partial sums
    slot = tl.arange(0, MP)[None, :]
    w = tl.arange(0, WP)
    d_bias = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)  # summed over tokens at the end
    columns_hash = channel_hashes(c, feature_offset, s2, DROPOUT)
    K = n * C
    dp_mask = (w < W)[:, None] & c_live[None, :]
    dp = ()
    p_tiles = ()  # P's [WP, BLOCK_C] tile of each stream, loaded once
    if PRE:
        for i in tl.static_range(n):
            dp = dp + (tl.zeros([WP, BLOCK_C], dtype=tl.float32),)
            p_tiles = p_tiles + (tl.load(P + w[:, None] * K + (i * C + c)[None, :], mask=dp_mask, other=0.0),)
    for tile in range(tl.program_id(0), tl.cdiv(num_tokens, BLOCK_T), tl.num_programs(0)):
        tokens = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        rows = tokens.to(tl.int64)
        live = tokens < num_tokens
        mask = live[:, None] & c_live[None, :]
        x = streams_of(X, rows, c, mask, C, n, S)
        u, keep = sublayer_update(Y, Bias, rows, c, mask, C, p, token_hashes(Keys, rows, live, s0, s1, DROPOUT),
                                  columns_hash, threshold, HAS_BIAS, DROPOUT)
        grads = _stream_grads(Grad, rows, c, mask, C, n, CONTRACT, HAS_GRAD)
        if PRE:
            grads, dp = _with_pre_terms(grads, dp, x, u, HRes, HPost, DU, Pre, GHi, GLo, Coef, p_tiles, rows, tokens,
                                        live, c, mask, C, w, WP, n, X.dtype.element_ty, SPLIT, UPCAST)
        maps = tl.zeros([BLOCK_T, MP], dtype=tl.float32)
        du = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for i in tl.static_range(n):
            du += map_column(HPost, rows * n + i, live) * grads[i]
            maps = tl.where(slot == n * n + i, tl.sum(grads[i] * u, axis=1, keep_dims=True), maps)
        du = _dropped(du, keep, p, DROPOUT)
        tl.store(DY + rows[:, None] * C + c[None, :], du.to(DY.dtype.element_ty), mask=mask)
        d_bias += du
        if S == 1:  # one input stream: its gradient sums over the copies
            dx = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
            for i in tl.static_range(n):
                product = tl.sum(grads[i] * x[0], axis=1, keep_dims=True)
                for j in tl.static_range(n):
                    dx += map_column(HRes, rows * (n * n) + i * n + j, live) * grads[i]
                    maps = tl.where(slot == i * n + j, product, maps)
            tl.store(DX + rows[:, None] * C + c[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        else:
            for j in tl.static_range(n):
                dx = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
                for i in tl.static_range(n):
                    dx += map_column(HRes, rows * (n * n) + i * n + j, live) * grads[i]
                    maps = tl.where(slot == i * n + j, tl.sum(grads[i] * x[j], axis=1, keep_dims=True), maps)
                tl.store(DX + rows[:, None] * (n * C) + j * C + c[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        part = (chunk_start + rows[:, None]) * (n * n + n) + slot
        tl.store(DMapPart + part, maps, mask=live[:, None] & (slot < n * n + n))
    if HAS_BIAS:
        tl.store(DBiasPart + tl.program_id(0) * C + c, tl.sum(d_bias, axis=0), mask=c_live)
    if PRE:
        dp_slot = DPPart + tl.program_id(0).to(tl.int64) * W * K
        for i in tl.static_range(n):
            tl.store(dp_slot + w[:, None] * K + (i * C + c)[None, :], dp[i], mask=dp_mask)
