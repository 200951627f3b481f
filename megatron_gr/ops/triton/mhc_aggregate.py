"""mHC aggregate in Triton: the sublayer input ``u[t] = sum_i h_pre[t, i] x[t, i]``
``[T, C]``. Same semantics as :func:`megatron_gr.ops.pytorch.mhc.pytorch_mhc_aggregate`
(float32 sums, the result in x's dtype).

Forward: a program reads a ``[BLOCK_T, N, BLOCK_C]`` tile of the streams once and writes
``[BLOCK_T, BLOCK_C]``. Backward: a program walks the channels of ``BLOCK_T`` tokens,
reading x and the output gradient once, writing ``dx = h_pre ⊗ du`` and reducing
``dh_pre = x . du`` on chip. Nothing is saved but the inputs (x is kept by the merge and
the mappings anyway); the reference upcasts 16-bit streams to a float32 copy first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_gr.ops.triton.mhc_configs import blocks


@triton.jit
def _gate_tile(tokens, num_tokens, n: tl.constexpr, N: tl.constexpr):
    """Offsets and mask of ``h_pre[tokens, :]`` ``[BLOCK_T, N]``."""
    i = tl.arange(0, N)
    return tokens.to(tl.int64)[:, None] * n + i[None, :], (tokens < num_tokens)[:, None] & (i < n)[None, :]


@triton.jit
def _stream_tile(tokens, num_tokens, c, C, n: tl.constexpr, N: tl.constexpr):
    """Offsets and mask of ``x[tokens, :, c]`` ``[BLOCK_T, N, BLOCK_C]``."""
    i = tl.arange(0, N)
    offsets = tokens.to(tl.int64)[:, None, None] * (n * C) + i[None, :, None] * C + c[None, None, :]
    mask = (tokens < num_tokens)[:, None, None] & (i < n)[None, :, None] & (c < C)[None, None, :]
    return offsets, mask


@triton.jit
def _aggregate_fwd(X, H, Out, num_tokens, C, n: tl.constexpr, N: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    h_offsets, h_mask = _gate_tile(tokens, num_tokens, n, N)
    x_offsets, x_mask = _stream_tile(tokens, num_tokens, c, C, n, N)
    h = tl.load(H + h_offsets, mask=h_mask, other=0.0).to(tl.float32)
    x = tl.load(X + x_offsets, mask=x_mask, other=0.0).to(tl.float32)
    out = tl.sum(h[:, :, None] * x, axis=1)
    out_mask = (tokens < num_tokens)[:, None] & (c < C)[None, :]
    tl.store(Out + tokens.to(tl.int64)[:, None] * C + c[None, :], out.to(Out.dtype.element_ty), mask=out_mask)


@triton.jit
def _aggregate_bwd(X, H, Grad, DX, DH, num_tokens, C, n: tl.constexpr, N: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    live = tokens < num_tokens
    h_offsets, h_mask = _gate_tile(tokens, num_tokens, n, N)
    h = tl.load(H + h_offsets, mask=h_mask, other=0.0).to(tl.float32)
    dh = tl.zeros([BLOCK_T, N], dtype=tl.float32)
    for start in range(0, C, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        x_offsets, x_mask = _stream_tile(tokens, num_tokens, c, C, n, N)
        g = tl.load(Grad + tokens.to(tl.int64)[:, None] * C + c[None, :],
                    mask=live[:, None] & (c < C)[None, :], other=0.0).to(tl.float32)
        x = tl.load(X + x_offsets, mask=x_mask, other=0.0).to(tl.float32)
        tl.store(DX + x_offsets, (h[:, :, None] * g[:, None, :]).to(DX.dtype.element_ty), mask=x_mask)
        dh += tl.sum(x * g[:, None, :], axis=2)
    tl.store(DH + h_offsets, dh, mask=h_mask)


class _Aggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h_pre):
        x, h_pre = x.contiguous(), h_pre.contiguous()
        num_tokens, n, channels = x.shape
        out = torch.empty(num_tokens, channels, device=x.device, dtype=x.dtype)
        cfg = blocks("aggregate_fwd", streams=n, dtype=x.dtype)
        if num_tokens:
            grid = (triton.cdiv(num_tokens, cfg.block_t), triton.cdiv(channels, cfg.block_c))
            _aggregate_fwd[grid](x, h_pre, out, num_tokens, channels, n=n, N=triton.next_power_of_2(n),
                                 BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
        ctx.save_for_backward(x, h_pre)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, h_pre = ctx.saved_tensors
        num_tokens, n, channels = x.shape
        dx = torch.empty_like(x)
        dh = torch.empty(num_tokens, n, device=x.device, dtype=torch.float32)
        cfg = blocks("aggregate_bwd", streams=n, dtype=x.dtype)
        if num_tokens:
            _aggregate_bwd[(triton.cdiv(num_tokens, cfg.block_t),)](
                x, h_pre, grad.contiguous(), dx, dh, num_tokens, channels, n=n, N=triton.next_power_of_2(n),
                BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
            )
        return dx, dh.to(h_pre.dtype)


def triton_mhc_aggregate(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """Same semantics as :func:`megatron_gr.ops.pytorch.mhc.pytorch_mhc_aggregate`."""
    return _Aggregate.apply(x, h_pre)
