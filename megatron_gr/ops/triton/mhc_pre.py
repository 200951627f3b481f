"""The fused mHC pre op in Triton: the mappings and the aggregate as one autograd function,
``(u, h_post, h_res)`` from the streams x ``[T, n, C]``, ``u = sum_i h_pre[:, i] x[:, i]``.
Same semantics as :func:`megatron_gr.ops.pytorch.mhc.pytorch_mhc_pre` (the mappings of
:mod:`megatron_gr.ops.triton.mhc_mappings` then the aggregate of
:mod:`megatron_gr.ops.triton.mhc_aggregate`, with the same float32 math).

Forward (three kernels): the mappings' forward kernel (RMS, projection, gates, sigmoids:
one walk over x), the aggregate's forward kernel with the H_pre it wrote (a second walk
over x), then the Sinkhorn forward kernel on the H_res logits: the separate ops' kernels,
launched from one autograd function, so x is read twice. One kernel that walked each
token tile twice, the second time from L2 (16-token tiles on an L2-sized persistent grid,
``mma.sync`` products instead of ``wgmma``), ran slower on an H100 (n = 4, C = 1024,
65,536 bf16 tokens: 1378 µs against 788 µs for the two kernels): the second read of x
from HBM costs less than what that kernel gave up for the L2 re-read. Kept for the
backward: x, the logits ``[T, n² + 2n]``, ``1 / rms`` ``[T]``, H_pre ``[T, n]`` and the
H_res logits ``[T, n, n]`` (float32, small).

Backward (three kernels): the Sinkhorn backward gives the H_res logits' gradient; a gates
kernel walks x and ``du`` once per token tile for ``dh_pre = sum_c x[t, i, c] du[t, c]``
(which the gate math needs before anything else), then turns the three map gradients
into g and the RMS coefficient (the mappings' gates tile); the mappings' projection
backward walks x again and writes ``dx = g P - coef x + h_pre ⊗ du`` once, accumulating
``dP = gᵀ x``. HBM passes over x: forward 2 reads (as the separate ops); backward 2 reads
and 1 write of dx. Separately, mappings and aggregate backward read it twice and write two
dx that autograd then adds (an add kernel: two more reads and a write); launches: 3
forward as separately, 3 instead of 4 backward, one autograd node instead of three.

The same function runs the first sublayer's pre op on the block input x ``[T, C]``
(``triton_mhc_expand_pre``: the n copies are never made): the mappings' kernels see x as
one stream and the projection summed over the streams (the same logits: the copies are
equal), the aggregate weighs x by ``sum_i h_pre_i``, the gates kernel takes every stream's
product from the one ``x . du``, and the projection's gradient is the same for each copy.
"""

from __future__ import annotations

import torch
import triton

from megatron_gr.ops.triton.mhc_aggregate import aggregate_forward
from megatron_gr.ops.triton.mhc_configs import blocks
from megatron_gr.ops.triton.mhc_mappings import as_float32, gate_buffers, mappings_forward, projection_backward
from megatron_gr.ops.triton.mhc_merge_pre_kernels import pre_gates
from megatron_gr.ops.triton.mhc_sinkhorn import sinkhorn_backward, sinkhorn_forward


class _Pre(torch.autograd.Function):
    """``(u, h_post, h_res)`` from the streams, Sinkhorn included: one autograd node. x is
    ``[T, n, C]``, or the block input ``[T, C]`` standing for its ``streams`` copies (the
    expansion folded in: the maps see the projection summed over the streams, which
    gives the same logits, and ``u = (sum_i h_pre_i) x``)."""

    @staticmethod
    def forward(ctx, x, projection, alpha, bias, iterations, eps, streams):
        x = x.contiguous()
        expanded = x.dim() == 2
        values = x.unsqueeze(1) if expanded else x  # [T, S, C]
        p_in = _summed_over_streams(projection, streams) if expanded else projection
        (pre, post, res_logits), saved = mappings_forward(values, p_in, alpha, bias, eps, streams=streams)
        weights = pre.sum(1, keepdim=True) if expanded else pre  # [T, S]
        out = aggregate_forward(values, weights)
        h_res = sinkhorn_forward(res_logits, iterations)
        ctx.save_for_backward(x, *saved, weights, res_logits)
        ctx.iterations, ctx.streams = iterations, streams
        ctx.dtypes = (projection.dtype, alpha.dtype, bias.dtype)
        return out, post, h_res

    @staticmethod
    def backward(ctx, d_out, d_post, d_res):
        x, p32, alpha32, bias32, logits, inv_rms, weights, res_logits = ctx.saved_tensors
        values = x.unsqueeze(1) if x.dim() == 2 else x
        num_tokens, stored, channels = values.shape
        n = ctx.streams
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
            unused = x  # the merge's pointers and dropout arguments: not read without MERGE
            pre_gates[(tiles,)](
                values, unused, unused, unused, unused, unused, unused, d_out, d_post, d_res_logits, logits, inv_rms,
                alpha32, bias32, g_hi, g_lo, coef, d_bias_part, d_alpha_part, num_tokens, channels, 0.0, 0, 0, 0, 0, 0,
                n=n,
                S=stored, W=W, WP=WP, BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, MERGE=False, HAS_BIAS=False,
                DROPOUT=False, DEVICE_WORDS=False, SPLIT=split, num_warps=cfg.num_warps,
            )
        dx, dp = projection_backward(values, p32, g_hi, g_lo, coef, pre=weights, grad=d_out, streams=n)
        if stored == 1:  # every copy's share of the projection saw the same values
            dx, dp = dx.view(num_tokens, channels), dp.repeat(1, n)
        p_dtype, alpha_dtype, bias_dtype = ctx.dtypes
        d_alpha, d_bias = d_alpha_part.sum(0)[:3], d_bias_part.sum(0)[:W]
        return dx, dp.to(p_dtype), d_alpha.to(alpha_dtype), d_bias.to(bias_dtype), None, None, None


def _summed_over_streams(projection: torch.Tensor, n: int) -> torch.Tensor:
    """``[W, C]``: the projection's n column blocks added up, float32 (for n equal streams
    ``P x⃗ = (sum_i P_i) x``)."""
    width, flat = projection.shape
    return projection.detach().to(torch.float32).view(width, n, flat // n).sum(1)


def triton_mhc_pre(x, projection, alpha, bias, *, iterations: int, eps: float):
    """Same semantics as :func:`megatron_gr.ops.pytorch.mhc.pytorch_mhc_pre` for float32,
    bfloat16 or float16 streams and float32 parameters."""
    return _Pre.apply(x, projection, alpha, bias, iterations, eps, x.shape[1])


def triton_mhc_expand_pre(x, projection, alpha, bias, *, num_streams: int, iterations: int, eps: float):
    """Same semantics as :func:`megatron_gr.ops.pytorch.mhc_fused.pytorch_mhc_expand_pre`:
    the pre op of ``num_streams`` copies of x ``[T, C]``, which never reach memory."""
    return _Pre.apply(x, projection, alpha, bias, iterations, eps, num_streams)
