"""The fused mHC merge pairs in Triton: a sublayer's merge with the next sublayer's pre op
(``merge_pre``), and the block's last merge with the contraction of the streams
(``merge_contract``). Same semantics as :func:`megatron_gr.ops.pytorch.mhc_fused.pytorch_mhc_merge_pre`
and :func:`~megatron_gr.ops.pytorch.mhc_fused.pytorch_mhc_merge_contract` (the reference's
keyed dropout mask, hashed from the token keys in each kernel; float32 math, streams in
x's dtype). The kernels are in :mod:`megatron_gr.ops.triton.mhc_merge_pre_kernels`.

Why: between two sublayers the separate ops move the n C stream values of every token 13
times (forward: the merge reads x and writes x', the pre op reads x' twice; backward: the
pre op reads x' twice and writes its dx, the merge reads x and its gradient and writes
dx, and autograd adds the two gradients of x': two reads and a write). The pair moves
them 7 times:

- forward (three kernels): one walk writes x' and accumulates its mappings (x' in
  registers, rounded as stored), the aggregate reads x' once more for ``u`` (it needs
  H_pre, known only after the whole token was seen), then Sinkhorn;
- backward (three kernels): Sinkhorn's backward; a gates kernel walks x (recomputing x')
  and ``du`` once for ``dh_pre``; one kernel reads x and the gradient of x' and writes dx,
  with the pre op's gradient terms added to the merged streams' gradient in registers
  (no second stream gradient, no autograd add).

Kept for the backward: the merge's inputs (x, h_res, h_post, y, bias, the dropout's token keys
and, under CUDA graphs, its stream-word tensor),
the float32 map parameters and the pre op's small float32 maps (logits, 1/rms, H_pre,
H_res logits) -- not x', which the backward recomputes from x and y.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from megatron_gr.ops.triton.availability import interpreter_enabled
from megatron_gr.ops.triton.keyed_dropout import kernel_key_args
from megatron_gr.ops.triton.mhc_aggregate import aggregate_forward
from megatron_gr.ops.triton.mhc_configs import blocks
from megatron_gr.ops.triton.multiprocessors import multiprocessors
from megatron_gr.ops.triton.mhc_mappings import as_float32, gate_buffers, map_buffers, mapping_params
from megatron_gr.ops.triton.mhc_merge_pre_kernels import merge_bwd_fused, merge_fwd_fused, pre_gates
from megatron_gr.ops.triton.mhc_sinkhorn import sinkhorn_backward, sinkhorn_forward


def _layout(x: torch.Tensor, h_res: torch.Tensor) -> tuple[int, int, int, int]:
    """``(T, n, S, C)``: x is ``[T, n, C]`` (S = n) or the block input ``[T, C]`` (S = 1)."""
    num_tokens, n = h_res.shape[:2]
    stored = 1 if x.dim() == 2 else n
    return num_tokens, n, stored, x.shape[-1]


def _merge_grads(x, h_res, h_post, y, b, token_keys, words, grad, meta, *, pre=None, n_maps: int = 0):
    """Launches :func:`merge_bwd_fused`: returns ``dx, d_res, d_post, dy, d_bias`` and, with
    ``pre`` (the pre op's tensors: du, h_pre, g halves, coef, P in g's dtype), dP ``[W, n C]``."""
    has_bias, dropout_p, key_args, device_words, contract = meta
    num_tokens, n, stored, channels = _layout(x, h_res)
    device, f32 = x.device, torch.float32
    op = "merge_pre_bwd" if pre is not None else "merge_contract_bwd"
    cfg = blocks(op, streams=n, dtype=x.dtype)
    chunks = triton.cdiv(channels, cfg.block_c)
    ranges = max(1, min(triton.cdiv(num_tokens, cfg.block_t), 8 * multiprocessors(device) // chunks))
    dx, dy = torch.empty_like(x), torch.empty_like(y)
    width = n * n + n  # per token: the H_res gradient (row-major), then the H_post gradient
    maps = torch.empty(chunks, num_tokens, width, device=device, dtype=f32)
    alloc = torch.empty if num_tokens else torch.zeros  # every slot is written when the kernel runs
    d_bias = alloc(ranges, channels, device=device, dtype=f32)
    W = n_maps * n_maps + 2 * n_maps
    dp = alloc(ranges, W, n * channels, device=device, dtype=f32) if pre is not None else d_bias
    du, h_pre, g_hi, g_lo, coef, p_g = pre if pre is not None else (y,) * 6  # any pointers: not read
    if num_tokens:
        merge_bwd_fused[(ranges, chunks)](
            x, h_res, h_post, y, b, token_keys, words, y if grad is None else grad, du, h_pre, g_hi, g_lo, coef, p_g,
            dx, dy, maps, d_bias, dp, num_tokens, channels, dropout_p, *key_args, n=n, S=stored,
            MP=triton.next_power_of_2(width), W=max(W, 1), WP=g_hi.shape[1] if pre is not None else 16,
            BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, PRE=pre is not None, CONTRACT=contract,
            HAS_GRAD=grad is not None, HAS_BIAS=has_bias, DROPOUT=dropout_p > 0.0, DEVICE_WORDS=device_words,
            SPLIT=x.dtype == torch.bfloat16,
            UPCAST=interpreter_enabled(), **cfg.launch(),
        )
    maps = maps.sum(0) if chunks > 1 else maps[0]
    d_res, d_post = maps[:, : n * n].reshape(num_tokens, n, n), maps[:, n * n :]
    grad_bias = d_bias.sum(0).to(b.dtype) if has_bias else None
    return dx, d_res.to(h_res.dtype), d_post.to(h_post.dtype), dy, grad_bias, (dp.sum(0) if pre is not None else None)


class _MergePre(torch.autograd.Function):
    """``(x', u, h_post', h_res')``: the merge of x and the pre op of x' with the next
    sublayer's maps, one autograd node."""

    @staticmethod
    def forward(ctx, x, h_res, h_post, y, bias, projection, alpha, map_bias, iterations, eps, dropout_p, keys):
        x, h_res, h_post, y = x.contiguous(), h_res.contiguous(), h_post.contiguous(), y.contiguous()
        num_tokens, n, stored, channels = _layout(x, h_res)
        W = n * n + 2 * n
        WP = max(16, triton.next_power_of_2(W))
        split = x.dtype == torch.bfloat16
        token_keys, words, key_args, device_words = kernel_key_args(keys, dropout_p, x.device)
        has_bias = bias is not None
        b = bias.contiguous() if has_bias else y  # any pointer: not read
        p32, p_hi, p_lo, alpha32, bias32 = mapping_params(projection, alpha, map_bias, split=split)
        pre, post, res_logits, logits, inv_rms = map_buffers(num_tokens, n, x.device)
        out = torch.empty(num_tokens, n, channels, device=x.device, dtype=x.dtype)
        cfg = blocks("merge_pre_fwd", streams=n, dtype=x.dtype)
        if num_tokens:
            merge_fwd_fused[(triton.cdiv(num_tokens, cfg.block_t),)](
                x, h_res, h_post, y, b, token_keys, words, out, p_hi, p_lo, alpha32, bias32, pre, post, res_logits, logits,
                inv_rms, num_tokens, channels, dropout_p, *key_args, eps, n=n, S=stored, W=W, WP=WP, BLOCK_T=cfg.block_t,
                BLOCK_C=cfg.block_c, MAPS=True, CONTRACT=False, HAS_BIAS=has_bias, DROPOUT=dropout_p > 0.0,
                DEVICE_WORDS=device_words,
                SPLIT=split, UPCAST=interpreter_enabled(), **cfg.launch(),
            )
        u = aggregate_forward(out, pre)
        h_res_next = sinkhorn_forward(res_logits, iterations)
        ctx.save_for_backward(x, h_res, h_post, y, b, token_keys, words, p32, alpha32, bias32, logits, inv_rms, pre,
                              res_logits)
        ctx.meta = (has_bias, dropout_p, key_args, device_words, False)
        ctx.iterations = iterations
        ctx.dtypes = (projection.dtype, alpha.dtype, map_bias.dtype)
        return out, u, post, h_res_next

    @staticmethod
    def backward(ctx, d_out, d_u, d_post, d_res):
        (x, h_res, h_post, y, b, token_keys, words, p32, alpha32, bias32, logits, inv_rms, pre,
         res_logits) = ctx.saved_tensors
        has_bias, dropout_p, key_args, device_words, _ = ctx.meta
        num_tokens, n, stored, channels = _layout(x, h_res)
        W = n * n + 2 * n
        WP = max(16, triton.next_power_of_2(W))
        device = x.device
        split = x.dtype == torch.bfloat16
        d_u = torch.zeros(num_tokens, channels, device=device, dtype=x.dtype) if d_u is None else d_u.contiguous()
        d_post = as_float32(d_post, (num_tokens, n), device)
        d_res_logits = (torch.zeros_like(res_logits) if d_res is None
                        else sinkhorn_backward(res_logits, d_res, ctx.iterations))
        cfg = blocks("merge_pre_bwd_gates", streams=n, dtype=x.dtype)
        tiles = max(1, triton.cdiv(num_tokens, cfg.block_t))
        g_hi, g_lo, coef, d_bias_part, d_alpha_part = gate_buffers(num_tokens, WP, tiles, split, device)
        if num_tokens:
            pre_gates[(tiles,)](
                x, h_res, h_post, y, b, token_keys, words, d_u, d_post, d_res_logits, logits, inv_rms, alpha32, bias32, g_hi,
                g_lo, coef, d_bias_part, d_alpha_part, num_tokens, channels, dropout_p, *key_args, n=n, S=stored, W=W, WP=WP,
                BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, MERGE=True, HAS_BIAS=has_bias, DROPOUT=dropout_p > 0.0,
                DEVICE_WORDS=device_words,
                SPLIT=split, **cfg.launch(),
            )
        dx, d_res_in, d_post_in, dy, grad_bias, dp = _merge_grads(
            x, h_res, h_post, y, b, token_keys, words, None if d_out is None else d_out.contiguous(), ctx.meta,
            pre=(d_u, pre, g_hi, g_lo, coef, p32.to(g_hi.dtype)), n_maps=n,
        )
        p_dtype, alpha_dtype, bias_dtype = ctx.dtypes
        d_alpha, d_map_bias = d_alpha_part.sum(0)[:3], d_bias_part.sum(0)[:W]
        return (dx, d_res_in, d_post_in, dy, grad_bias, dp.to(p_dtype), d_alpha.to(alpha_dtype),
                d_map_bias.to(bias_dtype), None, None, None, None)


class _MergeContract(torch.autograd.Function):
    """The mean of the n merged streams ``[T, C]``; x' never reaches memory."""

    @staticmethod
    def forward(ctx, x, h_res, h_post, y, bias, dropout_p, keys):
        x, h_res, h_post, y = x.contiguous(), h_res.contiguous(), h_post.contiguous(), y.contiguous()
        num_tokens, n, stored, channels = _layout(x, h_res)
        token_keys, words, key_args, device_words = kernel_key_args(keys, dropout_p, x.device)
        has_bias = bias is not None
        b = bias.contiguous() if has_bias else y  # any pointer: not read
        out = torch.empty(num_tokens, channels, device=x.device, dtype=x.dtype)
        cfg = blocks("merge_contract_fwd", streams=n, dtype=x.dtype)
        if num_tokens:
            merge_fwd_fused[(triton.cdiv(num_tokens, cfg.block_t),)](
                x, h_res, h_post, y, b, token_keys, words, out, y, y, y, y, y, y, y, y, y, num_tokens, channels, dropout_p,
                *key_args, 0.0,
                n=n, S=stored, W=1, WP=16, BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, MAPS=False, CONTRACT=True,
                HAS_BIAS=has_bias, DROPOUT=dropout_p > 0.0, DEVICE_WORDS=device_words, SPLIT=False,
                UPCAST=interpreter_enabled(),
                **cfg.launch(),
            )
        ctx.save_for_backward(x, h_res, h_post, y, b, token_keys, words)
        ctx.meta = (has_bias, dropout_p, key_args, device_words, True)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, h_res, h_post, y, b, token_keys, words = ctx.saved_tensors
        dx, d_res, d_post, dy, grad_bias, _ = _merge_grads(x, h_res, h_post, y, b, token_keys, words,
                                                           grad.contiguous(), ctx.meta)
        return dx, d_res, d_post, dy, grad_bias, None, None


def triton_mhc_merge_pre(x, h_res, h_post, y, bias, projection, alpha, map_bias, *, iterations: int, eps: float,
                         dropout_p: float, training: bool, dropout_keys=None):
    """Same semantics and dropout mask as :func:`megatron_gr.ops.pytorch.mhc_fused.pytorch_mhc_merge_pre`
    for float32, bfloat16 or float16 streams and float32 maps."""
    return _MergePre.apply(x, h_res, h_post, y, bias, projection, alpha, map_bias, iterations, eps,
                           dropout_p if training else 0.0, dropout_keys)


def triton_mhc_merge_contract(x: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor, y: torch.Tensor,
                              bias: Optional[torch.Tensor], *, dropout_p: float, training: bool,
                              dropout_keys=None) -> torch.Tensor:
    """Same semantics and dropout mask as :func:`megatron_gr.ops.pytorch.mhc_fused.pytorch_mhc_merge_contract`."""
    return _MergeContract.apply(x, h_res, h_post, y, bias, dropout_p if training else 0.0, dropout_keys)
