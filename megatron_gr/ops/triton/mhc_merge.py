"""mHC merge in Triton, a bias-dropout-add into mixed streams:
``out[t, i] = sum_j h_res[t, i, j] x[t, j] + h_post[t, i] dropout(y[t] + bias)``.
Same semantics as :func:`megatron_gr.ops.pytorch.mhc.pytorch_mhc_merge` (one dropout mask
per token shared by the streams; float32 math, the result in x's dtype).

Both directions hold every stream as its own ``[BLOCK_T, BLOCK_C]`` tile
(:mod:`megatron_gr.ops.triton.mhc_tiles`). Forward: a program reads the n stream tiles
and the sublayer output once and writes the n new tiles; ``y + bias`` and its dropout never
reach memory. Backward: programs own a channel chunk and a range of token tiles; each tile
reads x, y and the output gradient once and writes dx and dy, with the dropout mask
regenerated from the forward's seed (Philox, one call per 4 channels of a token: see
``_uniform``) instead of stored. Per
token the ``n² + n`` products ``g_i . x_j`` and ``g_i . u`` (the H_res and H_post
gradients) are reduced over the chunk's channels within a warp and stored as one row per
chunk, added up afterwards (4 (n² + n) bytes per token and chunk written and read again:
about 2% of the bytes the kernel moves at n = 4 with 256 bf16 channels per chunk); the
bias gradient is summed in registers per program and over the programs afterwards.

The seed is drawn from the current device generator (megatron's RNG tracker state when
forked): a replay under megatron's checkpointing restores that state and draws the same
mask. Masks differ from ``torch.nn.functional.dropout``'s.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from megatron_gr.ops.triton.mhc_configs import blocks, multiprocessors
from megatron_gr.ops.triton.mhc_tiles import map_column, stream_tiles


@triton.jit
def _bias_row(Bias, c, C, HAS_BIAS: tl.constexpr):
    """``bias[c]`` as a ``[1, BLOCK_C]`` float32 row (zeros without a bias), loaded once per
    program."""
    if HAS_BIAS:
        return tl.load(Bias + c[None, :], mask=(c < C)[None, :], other=0.0).to(tl.float32)
    return tl.zeros([1, c.shape[0]], dtype=tl.float32)


@triton.jit
def _uniform(Seed, rows, c_start, C, BLOCK_C: tl.constexpr):
    """Uniform [0, 1) numbers of a ``[BLOCK_T, BLOCK_C]`` tile (``c_start`` a multiple of
    4): one Philox call per 4 channels of a token, counter ``t ceil(C / 4) + c // 4``,
    channel c taking output ``c % 4`` (a quarter of the Philox work of one call per
    value); the same numbers whatever the block sizes."""
    quads = c_start // 4 + tl.arange(0, BLOCK_C // 4)
    r0, r1, r2, r3 = tl.randint4x(tl.load(Seed), rows[:, None] * tl.cdiv(C, 4) + quads[None, :])
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [rows.shape[0], BLOCK_C])  # r0 r1 r2 r3 r0 ...
    return tl.random.uint_to_uniform_float(r)


@triton.jit
def _update(Y, b, Seed, rows, c, c_start, mask, C, p, BLOCK_C: tl.constexpr, DROPOUT: tl.constexpr):
    """``dropout(y + b)`` of a ``[BLOCK_T, BLOCK_C]`` tile in float32, and its keep mask."""
    u = tl.load(Y + rows[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32) + b
    keep = mask
    if DROPOUT:
        keep = _uniform(Seed, rows, c_start, C, BLOCK_C) >= p
        u = tl.where(keep, u / (1.0 - p), 0.0)
    return u, keep


@triton.jit(do_not_specialize=["num_tokens"])
def _merge_fwd(X, HRes, HPost, Y, Bias, Seed, Out, num_tokens, C, p, n: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tokens.to(tl.int64)
    live = tokens < num_tokens
    mask = live[:, None] & (c < C)[None, :]
    stream0 = rows[:, None] * (n * C) + c[None, :]
    x = stream_tiles(X, stream0, mask, C, n)
    u, _ = _update(Y, _bias_row(Bias, c, C, HAS_BIAS), Seed, rows, c, tl.program_id(1) * BLOCK_C, mask, C, p,
                   BLOCK_C, DROPOUT)
    for i in tl.static_range(n):
        out = map_column(HPost, rows * n + i, live) * u
        for j in tl.static_range(n):
            out += map_column(HRes, rows * (n * n) + i * n + j, live) * x[j]
        tl.store(Out + stream0 + i * C, out.to(Out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_tokens"])
def _merge_bwd(X, HRes, HPost, Y, Bias, Seed, Grad, DX, DY, DMapPart, DBiasPart, num_tokens, C, p,
               n: tl.constexpr, MP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
               HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr):
    """One channel chunk of a range of token tiles. Every stream is its own
    ``[BLOCK_T, BLOCK_C]`` tile, so sums over streams are register adds; the only reductions
    run over the channels of a token (within a warp when one warp spans the chunk's channels
    of a token). Per token the chunk's ``g_i . x_j`` (H_res) and ``g_i . u`` (H_post)
    partial sums go to one row of ``MP >= n² + n`` floats, stored once per tile."""
    chunk = tl.program_id(1)
    c = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
    c_live = c < C
    chunk_start = chunk.to(tl.int64) * num_tokens  # first token row of this chunk's partial sums
    b = _bias_row(Bias, c, C, HAS_BIAS)
    slot = tl.arange(0, MP)[None, :]
    d_bias = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)  # summed over tokens at the end
    for tile in range(tl.program_id(0), tl.cdiv(num_tokens, BLOCK_T), tl.num_programs(0)):
        tokens = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        rows = tokens.to(tl.int64)
        live = tokens < num_tokens
        mask = live[:, None] & c_live[None, :]
        stream0 = rows[:, None] * (n * C) + c[None, :]
        g = stream_tiles(Grad, stream0, mask, C, n)
        x = stream_tiles(X, stream0, mask, C, n)
        u, keep = _update(Y, b, Seed, rows, c, chunk * BLOCK_C, mask, C, p, BLOCK_C, DROPOUT)
        maps = tl.zeros([BLOCK_T, MP], dtype=tl.float32)
        du = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for i in tl.static_range(n):
            du += map_column(HPost, rows * n + i, live) * g[i]
            maps = tl.where(slot == n * n + i, tl.sum(g[i] * u, axis=1, keep_dims=True), maps)
        if DROPOUT:
            du = tl.where(keep, du / (1.0 - p), 0.0)
        tl.store(DY + rows[:, None] * C + c[None, :], du.to(DY.dtype.element_ty), mask=mask)
        d_bias += du
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
    def forward(ctx, x, h_res, h_post, y, bias, dropout_p):
        x, h_res, h_post, y = x.contiguous(), h_res.contiguous(), h_post.contiguous(), y.contiguous()
        num_tokens, n, channels = x.shape
        dropout = dropout_p > 0.0
        # From the current generator (megatron's tracker state under its fork()); stays on
        # the device: no synchronisation.
        seed = (
            torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64)
            if dropout else torch.zeros(1, device=x.device, dtype=torch.int64)
        )
        has_bias = bias is not None
        b = bias.contiguous() if has_bias else y  # any pointer: not read
        out = torch.empty_like(x)
        cfg = blocks("merge_fwd", streams=n, dtype=x.dtype)
        if num_tokens:
            grid = (triton.cdiv(num_tokens, cfg.block_t), triton.cdiv(channels, cfg.block_c))
            _merge_fwd[grid](
                x, h_res, h_post, y, b, seed, out, num_tokens, channels, dropout_p, n=n,
                BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, HAS_BIAS=has_bias, DROPOUT=dropout, num_warps=cfg.num_warps,
            )
        ctx.save_for_backward(x, h_res, h_post, y, b, seed)
        ctx.meta = (has_bias, dropout_p)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, h_res, h_post, y, b, seed = ctx.saved_tensors
        has_bias, dropout_p = ctx.meta
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
                x, h_res, h_post, y, b, seed, grad.contiguous(), dx, dy, maps, d_bias, num_tokens, channels,
                dropout_p, n=n, MP=triton.next_power_of_2(width), BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c,
                HAS_BIAS=has_bias, DROPOUT=dropout_p > 0.0, num_warps=cfg.num_warps,
            )
        else:
            d_bias.zero_()
        maps = maps.sum(0) if chunks > 1 else maps[0]
        d_res, d_post = maps[:, : n * n].reshape(num_tokens, n, n), maps[:, n * n :]
        grad_bias = d_bias.sum(0).to(b.dtype) if has_bias else None
        return dx, d_res.to(h_res.dtype), d_post.to(h_post.dtype), dy, grad_bias, None


def triton_mhc_merge(
    x: torch.Tensor,
    h_res: torch.Tensor,
    h_post: torch.Tensor,
    y: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    dropout_p: float,
    training: bool,
) -> torch.Tensor:
    """Same semantics as :func:`megatron_gr.ops.pytorch.mhc.pytorch_mhc_merge` (a different
    dropout mask: Philox in the kernel)."""
    return _Merge.apply(x, h_res, h_post, y, bias, dropout_p if training else 0.0)
