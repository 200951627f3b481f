"""The fused mHC pre op in Triton: the mappings and the aggregate as one autograd function,
``(u, h_post, h_res)`` from the streams x ``[T, n, C]``, ``u = sum_i h_pre[:, i] x[:, i]``.
Same semantics as :func:`megatron_gr.ops.pytorch.mhc.pytorch_mhc_pre` (the mappings of
:mod:`megatron_gr.ops.triton.mhc_mappings` then the aggregate of
:mod:`megatron_gr.ops.triton.mhc_aggregate`, with the same float32 math).

Forward (two kernels): a program loops over token tiles of ``BLOCK_T`` tokens; per tile it
walks the ``n C`` values once for the RMS and the projection (the mappings' forward,
:func:`logits_tile`), which gives H_pre in registers, then walks the tile's channels a
second time, n stream tiles per chunk, and writes ``u``. The second walk reads what the
first read a moment ago: with 16-token tiles (128 KiB at n = 4, C = 1024, bf16) and about
as many programs as keep their tiles within half the L2 cache (``resident_programs``), it
should be served from L2, so that x leaves HBM once (not yet measured: ncu's dram bytes of
the kernel would show it). The Sinkhorn forward kernel then turns the H_res logits into
H_res. Kept for the backward: x, the logits ``[T, n² + 2n]``, ``1 / rms``
``[T]``, H_pre ``[T, n]`` and the H_res logits ``[T, n, n]`` (float32, small).

Backward (three kernels): the Sinkhorn backward gives the H_res logits' gradient; a gates
kernel walks x and ``du`` once per token tile for ``dh_pre = sum_c x[t, i, c] du[t, c]``
(which the gate math needs before anything else), then turns the three map gradients
into g and the RMS coefficient (the mappings' gates tile); the mappings' projection
backward walks x again and writes ``dx = g P - coef x + h_pre ⊗ du`` once, accumulating
``dP = gᵀ x``. HBM passes over x: forward 1 read (plus the L2 re-read); backward 2 reads
and 1 write of dx. Separately, mappings and aggregate read x twice forward, and backward
read it twice and write two dx that autograd then adds (an add kernel: two more reads and
a write); launches: 2 instead of 3 forward, 3 instead of 4 backward, one autograd node
instead of three.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_gr.ops.triton.availability import interpreter_enabled
from megatron_gr.ops.triton.mhc_configs import blocks, resident_programs
from megatron_gr.ops.triton.mhc_mappings import (
    as_float32,
    gate_buffers,
    gates_tile,
    logits_tile,
    projection_backward,
    projection_operands,
)
from megatron_gr.ops.triton.mhc_sinkhorn import sinkhorn_backward, sinkhorn_forward
from megatron_gr.ops.triton.mhc_tiles import stream_tiles


@triton.jit
def _pre_fwd(X, PHi, PLo, Alpha, Bias, Pre, Post, ResLogits, Logits, InvRms, Out, num_tokens, C, eps,
             n: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
             SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    K = n * C
    col = tl.arange(0, WP)[None, :]
    for tile in range(tl.program_id(0), tl.cdiv(num_tokens, BLOCK_T), tl.num_programs(0)):
        rows, live, s = logits_tile(X, PHi, PLo, Alpha, Bias, Pre, Post, ResLogits, Logits, InvRms, tile, num_tokens,
                                    K, eps, n, W, WP, BLOCK_T, BLOCK_C, SPLIT, UPCAST)
        h = ()  # H_pre of the tile as n [BLOCK_T, 1] columns
        for i in tl.static_range(n):
            h = h + (tl.sum(tl.where(col == i, s, 0.0), axis=1)[:, None],)
        for start in range(0, C, BLOCK_C):  # the second walk: the tile's x is in L2
            c = start + tl.arange(0, BLOCK_C)
            mask = live[:, None] & (c < C)[None, :]
            x = stream_tiles(X, rows[:, None] * K + c[None, :], mask, C, n)
            out = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
            for i in tl.static_range(n):
                out += h[i] * x[i]
            tl.store(Out + rows[:, None] * C + c[None, :], out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _pre_bwd_gates(X, Grad, DPost, DRes, Logits, InvRms, Alpha, Bias, GHi, GLo, Coef, DBiasPart, DAlphaPart,
                   num_tokens, C, n: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_C: tl.constexpr, SPLIT: tl.constexpr):
    """``dh_pre`` of ``BLOCK_T`` tokens from one walk over their x and ``du`` (products
    per stream in registers, reduced over the channels once), then :func:`gates_tile`."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = tokens.to(tl.int64)
    live = tokens < num_tokens
    products = ()
    for i in tl.static_range(n):
        products = products + (tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32),)
    for start in range(0, C, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        mask = live[:, None] & (c < C)[None, :]
        du = tl.load(Grad + rows[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        x = stream_tiles(X, rows[:, None] * (n * C) + c[None, :], mask, C, n)
        summed = ()
        for i in tl.static_range(n):
            summed = summed + (products[i] + x[i] * du,)
        products = summed
    col = tl.arange(0, WP)[None, :]
    d_pre = tl.zeros([BLOCK_T, WP], dtype=tl.float32)
    for i in tl.static_range(n):
        d_pre = tl.where(col == i, tl.sum(products[i], axis=1, keep_dims=True), d_pre)
    gates_tile(d_pre, DPost, DRes, Logits, InvRms, Alpha, Bias, GHi, GLo, Coef, DBiasPart, DAlphaPart, num_tokens,
               n * C, n, W, WP, BLOCK_T, SPLIT)


class _Pre(torch.autograd.Function):
    """``(u, h_post, h_res)`` from the streams, Sinkhorn included: one autograd node."""

    @staticmethod
    def forward(ctx, x, projection, alpha, bias, iterations, eps):
        num_tokens, n, channels = x.shape
        K, W = n * channels, n * n + 2 * n
        WP = max(16, triton.next_power_of_2(W))
        x = x.contiguous()
        device, f32 = x.device, torch.float32
        split = x.dtype == torch.bfloat16
        p32, p_hi, p_lo = projection_operands(projection, split)
        pre = torch.empty(num_tokens, n, device=device, dtype=f32)
        post = torch.empty_like(pre)
        res_logits = torch.empty(num_tokens, n, n, device=device, dtype=f32)
        logits = torch.empty(num_tokens, W, device=device, dtype=f32)
        inv_rms = torch.empty(num_tokens, device=device, dtype=f32)
        out = torch.empty(num_tokens, channels, device=device, dtype=x.dtype)
        alpha32, bias32 = alpha.detach().to(f32).contiguous(), bias.detach().to(f32).contiguous()
        cfg = blocks("pre_fwd", streams=n, dtype=x.dtype)
        if num_tokens:
            tiles = triton.cdiv(num_tokens, cfg.block_t)
            programs = resident_programs(device, tiles, cfg.block_t * K * x.element_size())
            _pre_fwd[(programs,)](
                x, p_hi, p_lo, alpha32, bias32, pre, post, res_logits, logits, inv_rms, out, num_tokens, channels,
                eps, n=n, W=W, WP=WP, BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, SPLIT=split,
                UPCAST=interpreter_enabled(), num_warps=cfg.num_warps,
            )
        h_res = sinkhorn_forward(res_logits, iterations)
        ctx.save_for_backward(x, p32, alpha32, bias32, logits, inv_rms, pre, res_logits)
        ctx.iterations = iterations
        ctx.dtypes = (projection.dtype, alpha.dtype, bias.dtype)
        return out, post, h_res

    @staticmethod
    def backward(ctx, d_out, d_post, d_res):
        x, p32, alpha32, bias32, logits, inv_rms, pre, res_logits = ctx.saved_tensors
        num_tokens, n, channels = x.shape
        W = n * n + 2 * n
        WP = max(16, triton.next_power_of_2(W))
        device = x.device
        d_out = (torch.zeros(num_tokens, channels, device=device, dtype=x.dtype) if d_out is None
                 else d_out.contiguous())
        d_post = as_float32(d_post, (num_tokens, n), device)
        d_res_logits = (torch.zeros_like(res_logits) if d_res is None
                        else sinkhorn_backward(res_logits, d_res, ctx.iterations))
        split = x.dtype == torch.bfloat16
        cfg = blocks("pre_bwd_gates", streams=n, dtype=x.dtype)
        tiles = max(1, triton.cdiv(num_tokens, cfg.block_t))
        g_hi, g_lo, coef, d_bias_part, d_alpha_part = gate_buffers(num_tokens, WP, tiles, split, device)
        if num_tokens:
            _pre_bwd_gates[(tiles,)](
                x, d_out, d_post, d_res_logits, logits, inv_rms, alpha32, bias32, g_hi, g_lo, coef, d_bias_part,
                d_alpha_part, num_tokens, channels, n=n, W=W, WP=WP, BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c,
                SPLIT=split, num_warps=cfg.num_warps,
            )
        dx, dp = projection_backward(x, p32, g_hi, g_lo, coef, pre=pre, grad=d_out)
        p_dtype, alpha_dtype, bias_dtype = ctx.dtypes
        d_alpha, d_bias = d_alpha_part.sum(0)[:3], d_bias_part.sum(0)[:W]
        return dx, dp.to(p_dtype), d_alpha.to(alpha_dtype), d_bias.to(bias_dtype), None, None


def triton_mhc_pre(x, projection, alpha, bias, *, iterations: int, eps: float):
    """Same semantics as :func:`megatron_gr.ops.pytorch.mhc.pytorch_mhc_pre` for float32,
    bfloat16 or float16 streams and float32 parameters."""
    return _Pre.apply(x, projection, alpha, bias, iterations, eps)
