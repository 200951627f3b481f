"""mHC merge in Triton, a bias-dropout-add into mixed streams:
``out[t, i] = sum_j h_res[t, i, j] x[t, j] + h_post[t, i] dropout(y[t] + bias)``.
Same semantics as :func:`megatron_gr.ops.pytorch.mhc.pytorch_mhc_merge` (one dropout mask
per token shared by the streams; float32 math, the result in x's dtype).

Forward: a program reads the n stream rows of a ``[BLOCK_T, BLOCK_C]`` tile and the
sublayer output once and writes the n new rows; ``y + bias`` and its dropout never reach
memory. Backward: programs own a channel chunk and a range of token tiles; each tile reads
x, y and the output gradient once and writes dx and dy, with the dropout mask regenerated
from the forward's seed (Philox, counter ``t C + c``) instead of stored. The bias gradient
is summed in registers per program, the H_res and H_post gradients per channel chunk
(added up afterwards, ``n² + n`` floats per token and chunk).

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


@triton.jit
def _update(Y, Bias, Seed, rows, c, mask, C, p, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr):
    """``dropout(y + bias)`` of a ``[BLOCK_T, BLOCK_C]`` tile in float32, and its keep mask."""
    u = tl.load(Y + rows[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        u += tl.load(Bias + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
    keep = mask
    if DROPOUT:
        keep = tl.rand(tl.load(Seed), rows[:, None] * C + c[None, :]) >= p
        u = tl.where(keep, u / (1.0 - p), 0.0)
    return u, keep


@triton.jit
def _merge_fwd(X, HRes, HPost, Y, Bias, Seed, Out, num_tokens, C, p, n: tl.constexpr, N: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tokens.to(tl.int64)
    live = tokens < num_tokens
    mask = live[:, None] & (c < C)[None, :]
    i = tl.arange(0, N)
    h_mask = live[:, None] & (i < n)[None, :]
    mixed = tl.zeros([BLOCK_T, N, BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(n):
        x_j = tl.load(X + rows[:, None] * (n * C) + j * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        h_j = tl.load(HRes + rows[:, None] * (n * n) + i[None, :] * n + j, mask=h_mask, other=0.0)  # column j
        mixed += h_j.to(tl.float32)[:, :, None] * x_j[:, None, :]
    u, _ = _update(Y, Bias, Seed, rows, c, mask, C, p, HAS_BIAS, DROPOUT)
    h_post = tl.load(HPost + rows[:, None] * n + i[None, :], mask=h_mask, other=0.0).to(tl.float32)
    out = mixed + h_post[:, :, None] * u[:, None, :]
    offsets = rows[:, None, None] * (n * C) + i[None, :, None] * C + c[None, None, :]
    tl.store(Out + offsets, out.to(Out.dtype.element_ty), mask=h_mask[:, :, None] & (c < C)[None, None, :])


@triton.jit
def _merge_bwd(X, HRes, HPost, Y, Bias, Seed, Grad, DX, DY, DHResPart, DHPostPart, DBiasPart, num_tokens, C, p,
               n: tl.constexpr, N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
               HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr):
    chunk = tl.program_id(1)
    c = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk_start = chunk.to(tl.int64) * num_tokens  # first token row of this chunk's partial sums
    i = tl.arange(0, N)
    d_bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    for tile in range(tl.program_id(0), tl.cdiv(num_tokens, BLOCK_T), tl.num_programs(0)):
        tokens = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        rows = tokens.to(tl.int64)
        live = tokens < num_tokens
        mask = live[:, None] & (c < C)[None, :]
        h_mask = live[:, None] & (i < n)[None, :]
        g_offsets = rows[:, None, None] * (n * C) + i[None, :, None] * C + c[None, None, :]
        g_mask = h_mask[:, :, None] & (c < C)[None, None, :]
        g = tl.load(Grad + g_offsets, mask=g_mask, other=0.0).to(tl.float32)  # [BLOCK_T, N(i), BLOCK_C]
        u, keep = _update(Y, Bias, Seed, rows, c, mask, C, p, HAS_BIAS, DROPOUT)
        h_post = tl.load(HPost + rows[:, None] * n + i[None, :], mask=h_mask, other=0.0).to(tl.float32)
        d_post = tl.sum(g * u[:, None, :], axis=2)  # [BLOCK_T, N]
        du = tl.sum(h_post[:, :, None] * g, axis=1)  # [BLOCK_T, BLOCK_C]
        if DROPOUT:
            du = tl.where(keep, du / (1.0 - p), 0.0)
        tl.store(DY + rows[:, None] * C + c[None, :], du.to(DY.dtype.element_ty), mask=mask)
        d_bias += tl.sum(du, axis=0)
        d_res = tl.zeros([BLOCK_T, N, N], dtype=tl.float32)
        for j in tl.static_range(n):
            x_offsets = rows[:, None] * (n * C) + j * C + c[None, :]
            x_j = tl.load(X + x_offsets, mask=mask, other=0.0).to(tl.float32)
            h_j = tl.load(HRes + rows[:, None] * (n * n) + i[None, :] * n + j, mask=h_mask, other=0.0)
            dx_j = tl.sum(h_j.to(tl.float32)[:, :, None] * g, axis=1)  # sum_i h_res[i, j] g[i]
            tl.store(DX + x_offsets, dx_j.to(DX.dtype.element_ty), mask=mask)
            d_col = tl.sum(g * x_j[:, None, :], axis=2)  # [BLOCK_T, N(i)]: g[i] . x[j]
            d_res += tl.where(i[None, None, :] == j, d_col[:, :, None], 0.0)
        part = (chunk_start + rows[:, None, None]) * (n * n) + i[None, :, None] * n + i[None, None, :]
        tl.store(DHResPart + part, d_res, mask=h_mask[:, :, None] & (i < n)[None, None, :])
        tl.store(DHPostPart + (chunk_start + rows[:, None]) * n + i[None, :], d_post, mask=h_mask)
    if HAS_BIAS:
        tl.store(DBiasPart + tl.program_id(0) * C + c, d_bias, mask=c < C)


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
                x, h_res, h_post, y, b, seed, out, num_tokens, channels, dropout_p, n=n, N=triton.next_power_of_2(n),
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
        # every (chunk, token) slot is written by the one program owning that tile and chunk
        d_res = torch.empty(chunks, num_tokens, n, n, device=device, dtype=f32)
        d_post = torch.empty(chunks, num_tokens, n, device=device, dtype=f32)
        d_bias = torch.zeros(ranges, channels, device=device, dtype=f32)
        if num_tokens:
            _merge_bwd[(ranges, chunks)](
                x, h_res, h_post, y, b, seed, grad.contiguous(), dx, dy, d_res, d_post, d_bias, num_tokens, channels,
                dropout_p, n=n, N=triton.next_power_of_2(n), BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c,
                HAS_BIAS=has_bias, DROPOUT=dropout_p > 0.0, num_warps=cfg.num_warps,
            )
        grad_bias = d_bias.sum(0).to(b.dtype) if has_bias else None
        return dx, d_res.sum(0).to(h_res.dtype), d_post.sum(0).to(h_post.dtype), dy, grad_bias, None


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
