"""mHC merge in Triton, a bias-dropout-add into mixed streams:
``out[t, i] = sum_j h_res[t, i, j] x[t, j] + h_post[t, i] dropout(y[t] + bias)``.
Same semantics as :func:`megatron_gr.ops.pytorch.mhc.pytorch_mhc_merge` (one dropout mask
per token shared by the streams; float32 math, the result in x's dtype).

Both directions hold every stream as its own ``[BLOCK_T, BLOCK_C]`` tile
(:mod:`megatron_gr.ops.triton.mhc_tiles`). Forward: a program reads the n stream tiles
and the sublayer output once and writes the n new tiles; ``y + bias`` and its dropout never
reach memory. Backward: programs own a channel chunk and a range of token tiles; each tile
reads x, y and the output gradient once and writes dx and dy, with the keyed dropout mask
hashed again from the token keys (:mod:`megatron_gr.ops.triton.keyed_dropout`: the
reference's mask) instead of stored. Per
token the ``n² + n`` products ``g_i . x_j`` and ``g_i . u`` (the H_res and H_post
gradients) are reduced over the chunk's channels within a warp and stored as one row per
chunk, added up afterwards (4 (n² + n) bytes per token and chunk written and read again:
about 2% of the bytes the kernel moves at n = 4 with 256 bf16 channels per chunk); the
bias gradient is summed in registers per program and over the programs afterwards.

The mask is a function of the token keys, the site and the step seed only, so a replay
under recompute draws it again.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from megatron_gr.ops.triton.keyed_dropout import (
    column_hashes, keep_elements, kernel_key_args, row_hashes, stream_words_of,
)
from megatron_gr.ops.triton.mhc_configs import blocks
from megatron_gr.ops.triton.multiprocessors import multiprocessors
from megatron_gr.ops.triton.mhc_tiles import map_column, stream_tiles


@triton.jit
def _bias_row(Bias, c, C, HAS_BIAS: tl.constexpr):
    """``bias[c]`` as a ``[1, BLOCK_C]`` float32 row (zeros without a bias), loaded once per
    program."""
    if HAS_BIAS:
        return tl.load(Bias + c[None, :], mask=(c < C)[None, :], other=0.0).to(tl.float32)
    return tl.zeros([1, c.shape[0]], dtype=tl.float32)


@triton.jit
def _keep(Keys, rows, live, columns_hash, s0, s1, threshold, mask, DROPOUT: tl.constexpr):
    """The keyed dropout mask of a ``[BLOCK_T, BLOCK_C]`` tile (``columns_hash``: its
    channels hashed once per program); ``mask`` without dropout."""
    if DROPOUT:
        return keep_elements(row_hashes(Keys, rows, live, s0, s1), columns_hash, threshold)
    return mask


@triton.jit
def _dropped(values, keep, p, DROPOUT: tl.constexpr):
    if DROPOUT:
        return tl.where(keep, values / (1.0 - p), 0.0)
    return values


@triton.jit
def _update(Y, b, rows, c, mask, C):
    """``y + b`` of a ``[BLOCK_T, BLOCK_C]`` tile in float32."""
    return tl.load(Y + rows[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32) + b


@triton.jit(do_not_specialize=["num_tokens", "feature_offset", "s0", "s1", "s2", "threshold"])
def _merge_fwd(X, HRes, HPost, Y, Bias, Keys, Words, Out, num_tokens, C, p, feature_offset, s0, s1, s2, threshold,
               n: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr,
               DROPOUT: tl.constexpr, DEVICE_WORDS: tl.constexpr):
    s0, s1, s2 = stream_words_of(Words, s0, s1, s2, DEVICE_WORDS)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tokens.to(tl.int64)
    live = tokens < num_tokens
    mask = live[:, None] & (c < C)[None, :]
    stream0 = rows[:, None] * (n * C) + c[None, :]
    x = stream_tiles(X, stream0, mask, C, n)
    keep = _keep(Keys, rows, live, column_hashes(feature_offset + c, s2), s0, s1, threshold, mask, DROPOUT)
    u = _dropped(_update(Y, _bias_row(Bias, c, C, HAS_BIAS), rows, c, mask, C), keep, p, DROPOUT)
    for i in tl.static_range(n):
        out = map_column(HPost, rows * n + i, live) * u
        for j in tl.static_range(n):
            out += map_column(HRes, rows * (n * n) + i * n + j, live) * x[j]
        tl.store(Out + stream0 + i * C, out.to(Out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_tokens", "feature_offset", "s0", "s1", "s2", "threshold"])
def _merge_bwd(X, HRes, HPost, Y, Bias, Keys, Words, Grad, DX, DY, DMapPart, DBiasPart, num_tokens, C, p,
               feature_offset, s0, s1, s2, threshold, n: tl.constexpr, MP: tl.constexpr, BLOCK_T: tl.constexpr,
               BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, DEVICE_WORDS: tl.constexpr):
    """One channel chunk of a range of token tiles. Every stream is its own
    ``[BLOCK_T, BLOCK_C]`` tile, so sums over streams are register adds; the only reductions
    run over the channels of a token (within a warp when one warp spans the chunk's channels
    of a token). Per token the chunk's ``g_i . x_j`` (H_res) and ``g_i . u`` (H_post)
    partial sums go to one row of ``MP >= n² + n`` floats, stored once per tile."""
    s0, s1, s2 = stream_words_of(Words, s0, s1, s2, DEVICE_WORDS)
    chunk = tl.program_id(1)
    c = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
    c_live = c < C
    chunk_start = chunk.to(tl.int64) * num_tokens  # first token row of this chunk's partial sums
    b = _bias_row(Bias, c, C, HAS_BIAS)
    columns_hash = column_hashes(feature_offset + c, s2)
    slot = tl.arange(0, MP)[None, :]
    d_bias = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)  # summed over tokens at the end
    for tile in range(tl.program_id(0), tl.cdiv(num_tokens, BLOCK_T), tl.num_programs(0)):
        tokens = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        rows = tokens.to(tl.int64)
        live = tokens < num_tokens
        mask = live[:, None] & c_live[None, :]
        stream0 = rows[:, None] * (n * C) + c[None, :]
        # The mask is hashed before the tiles load and x loads only for the dx loop: fewer
        # live registers (no spills at n = 4 with bf16 streams).
        keep = _keep(Keys, rows, live, columns_hash, s0, s1, threshold, mask, DROPOUT)
        g = stream_tiles(Grad, stream0, mask, C, n)
        du = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for i in tl.static_range(n):
            du += map_column(HPost, rows * n + i, live) * g[i]
        du = _dropped(du, keep, p, DROPOUT)
        u = _dropped(_update(Y, b, rows, c, mask, C), keep, p, DROPOUT)
        maps = tl.zeros([BLOCK_T, MP], dtype=tl.float32)
        for i in tl.static_range(n):
            maps = tl.where(slot == n * n + i, tl.sum(g[i] * u, axis=1, keep_dims=True), maps)
        tl.store(DY + rows[:, None] * C + c[None, :], du.to(DY.dtype.element_ty), mask=mask)
        d_bias += du
        x = stream_tiles(X, stream0, mask, C, n)
        for j in tl.static_range(n):
            dx = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
            for i in tl.static_range(n):
                dx += map_column(HRes, rows * (n * n) + i * n + j, live) * g[i]
                maps = tl.where(slot == i * n + j, tl.sum(g[i] * x[j], axis=1, keep_dims=True), maps)
            tl.store(DX + stream0 + j * C, dx.to(DX.dtype.element_ty), mask=mask)
        part = (chunk_start + rows[:, None]) * (n * n + n) + slot
        tl.store(DMapPart + part, maps, mask=live[:, None] & (slot < n * n + n))
    if HAS_BIAS:
        tl.store(DBiasPart + tl.program_id(0) * C + c, tl.sum(d_bias, axis=0), mask=c_live)


class _Merge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h_res, h_post, y, bias, dropout_p, keys):
        x, h_res, h_post, y = x.contiguous(), h_res.contiguous(), h_post.contiguous(), y.contiguous()
        num_tokens, n, channels = x.shape
        dropout = dropout_p > 0.0
        token_keys, words, key_args, device_words = kernel_key_args(keys, dropout_p, x.device)
        has_bias = bias is not None
        b = bias.contiguous() if has_bias else y  # any pointer: not read
        out = torch.empty_like(x)
        cfg = blocks("merge_fwd", streams=n, dtype=x.dtype)
        if num_tokens:
            grid = (triton.cdiv(num_tokens, cfg.block_t), triton.cdiv(channels, cfg.block_c))
            _merge_fwd[grid](
                x, h_res, h_post, y, b, token_keys, words, out, num_tokens, channels, dropout_p, *key_args, n=n,
                BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, HAS_BIAS=has_bias, DROPOUT=dropout,
                DEVICE_WORDS=device_words, num_warps=cfg.num_warps,
            )
        ctx.save_for_backward(x, h_res, h_post, y, b, token_keys, words)
        ctx.meta = (has_bias, dropout_p, key_args, device_words)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, h_res, h_post, y, b, token_keys, words = ctx.saved_tensors
        has_bias, dropout_p, key_args, device_words = ctx.meta
        num_tokens, n, channels = x.shape
        cfg = blocks("merge_bwd", streams=n, dtype=x.dtype)
        chunks = triton.cdiv(channels, cfg.block_c)
        ranges = max(1, min(triton.cdiv(num_tokens, cfg.block_t), 8 * multiprocessors(x.device) // chunks))
        device, f32 = x.device, torch.float32
        dx, dy = torch.empty_like(x), torch.empty_like(y)
        # every (chunk, token) row is written by the one program owning that tile and chunk
        width = n * n + n  # per token: the H_res gradient (row-major), then the H_post gradient
        maps = torch.empty(chunks, num_tokens, width, device=device, dtype=f32)
        d_bias = torch.empty(ranges, channels, device=device, dtype=f32)
        if num_tokens:
            _merge_bwd[(ranges, chunks)](
                x, h_res, h_post, y, b, token_keys, words, grad.contiguous(), dx, dy, maps, d_bias, num_tokens,
                channels, dropout_p, *key_args, n=n, MP=triton.next_power_of_2(width), BLOCK_T=cfg.block_t,
                BLOCK_C=cfg.block_c, HAS_BIAS=has_bias, DROPOUT=dropout_p > 0.0, DEVICE_WORDS=device_words,
                num_warps=cfg.num_warps,
            )
        else:
            d_bias.zero_()
        maps = maps.sum(0) if chunks > 1 else maps[0]
        d_res, d_post = maps[:, : n * n].reshape(num_tokens, n, n), maps[:, n * n :]
        grad_bias = d_bias.sum(0).to(b.dtype) if has_bias else None
        return dx, d_res.to(h_res.dtype), d_post.to(h_post.dtype), dy, grad_bias, None, None


def triton_mhc_merge(
    x: torch.Tensor,
    h_res: torch.Tensor,
    h_post: torch.Tensor,
    y: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    dropout_p: float,
    training: bool,
    dropout_keys=None,
) -> torch.Tensor:
    """Same semantics and dropout mask as :func:`megatron_gr.ops.pytorch.mhc.pytorch_mhc_merge`."""
    return _Merge.apply(x, h_res, h_post, y, bias, dropout_p if training else 0.0, dropout_keys)
