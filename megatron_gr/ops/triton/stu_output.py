"""Fused STU output path in Triton: ``y = dropout(LayerNorm(attn) * u)``.

Forward: one pass over each row block reads attn and u once, writes y and the row
statistics (mean, 1/std). Backward: one pass recomputes the normalised row and the keyed
dropout mask (hashed from the token keys: :mod:`megatron_gr.ops.triton.keyed_dropout`, the
reference's mask), writes d_attn and d_u and accumulates the layer-norm weight gradients
per program (summed by the caller). The unfused path reads and writes the [T, D]
activations about three times more and stores the dropout mask.

Rows are ``[R, G, E]`` with a free row and group stride (D = G * E), so the per-head gate
``u`` can be read straight out of the fused UVQK projection without a copy.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from megatron_gr.ops.triton.keyed_dropout import (
    column_hashes, keep_elements, kernel_key_args, row_hashes, stream_words_of,
)
from megatron_gr.ops.triton.multiprocessors import multiprocessors


@triton.jit
def _row_block(X, U, W, B, Keys, rows, R, G, E, stride_xr, stride_xg, stride_ur, stride_ug, eps,
               feature_offset, s0, s1, s2, threshold,
               BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr):
    """Loads one row block; returns (xhat, ln, u, keep, mask, rstd, mean, cols)."""
    D = G * E
    cols = tl.arange(0, BLOCK_D)
    gi = cols // E
    ei = cols % E
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    x = tl.load(X + rows[:, None] * stride_xr + (gi * stride_xg + ei)[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
    xhat = xc * rstd[:, None]
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    ln = xhat * w[None, :]
    if HAS_BIAS:
        ln += tl.load(B + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    u = tl.load(U + rows[:, None] * stride_ur + (gi * stride_ug + ei)[None, :], mask=mask, other=0.0).to(tl.float32)
    if DROPOUT:
        keep = keep_elements(row_hashes(Keys, rows, rows < R, s0, s1), column_hashes(feature_offset + cols, s2),
                             threshold)
    else:
        keep = mask
    return xhat, ln, u, keep, mask, rstd, mean, cols, w


@triton.jit(do_not_specialize=["R", "feature_offset", "s0", "s1", "s2", "threshold"])
def _stu_output_fwd(X, U, W, B, Keys, Words, Y, Mean, Rstd, R, G, E, stride_xr, stride_xg, stride_ur, stride_ug,
                    eps, p, feature_offset, s0, s1, s2, threshold,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
                    DEVICE_WORDS: tl.constexpr):
    s0, s1, s2 = stream_words_of(Words, s0, s1, s2, DEVICE_WORDS)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    xhat, ln, u, keep, mask, rstd, mean, cols, w = _row_block(
        X, U, W, B, Keys, rows, R, G, E, stride_xr, stride_xg, stride_ur, stride_ug, eps,
        feature_offset, s0, s1, s2, threshold, BLOCK_D, HAS_BIAS, DROPOUT
    )
    y = ln * u
    if DROPOUT:
        y = tl.where(keep, y / (1.0 - p), 0.0)
    tl.store(Y + rows[:, None] * (G * E) + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=rows < R)
    tl.store(Rstd + rows, rstd, mask=rows < R)


@triton.jit(do_not_specialize=["R", "feature_offset", "s0", "s1", "s2", "threshold"])
def _stu_output_bwd(X, U, W, B, Keys, Words, DY, DX, DU, DW, DB, R, G, E, stride_xr, stride_xg, stride_ur,
                    stride_ug, eps, p, feature_offset, s0, s1, s2, threshold,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
                    DEVICE_WORDS: tl.constexpr):
    s0, s1, s2 = stream_words_of(Words, s0, s1, s2, DEVICE_WORDS)
    D = G * E
    pid = tl.program_id(0)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    # Persistent over row blocks: each program keeps one partial sum of dw and db.
    for start in range(pid * BLOCK_R, R, tl.num_programs(0) * BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        xhat, ln, u, keep, mask, rstd, mean, cols, w = _row_block(
            X, U, W, B, Keys, rows, R, G, E, stride_xr, stride_xg, stride_ur, stride_ug, eps,
            feature_offset, s0, s1, s2, threshold, BLOCK_D, HAS_BIAS, DROPOUT,
        )
        offs = rows[:, None] * D + cols[None, :]
        dz = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        if DROPOUT:
            dz = tl.where(keep, dz / (1.0 - p), 0.0)
        tl.store(DU + offs, (dz * ln).to(DU.dtype.element_ty), mask=mask)
        dln = dz * u
        dw += tl.sum(dln * xhat, 0)
        db += tl.sum(dln, 0)
        dxhat = dln * w[None, :]
        c1 = tl.sum(dxhat * xhat, 1) / D
        c2 = tl.sum(dxhat, 1) / D
        dx = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    cols = tl.arange(0, BLOCK_D)
    tl.store(DW + pid * D + cols, dw, mask=cols < D)
    tl.store(DB + pid * D + cols, db, mask=cols < D)


def _as_groups(t: torch.Tensor) -> torch.Tensor:
    """``[T, ...]`` as ``[T, G, E]`` with a unit innermost stride, copying only when needed."""
    view = t.unsqueeze(1) if t.dim() == 2 else t
    if view.dim() != 3:
        view = t.reshape(t.shape[0], 1, -1)
    return view if view.stride(-1) == 1 else view.contiguous()


def _block_rows(width: int) -> int:
    return max(1, min(16, 4096 // triton.next_power_of_2(width)))


class _STUOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attn, u, weight, bias, eps, dropout_p, keys):
        x, g = _as_groups(attn), _as_groups(u)
        if x.shape != g.shape:
            x, g = attn.reshape(attn.shape[0], 1, -1).contiguous(), u.reshape(u.shape[0], 1, -1).contiguous()
        rows, groups, inner = x.shape
        width = groups * inner
        y = torch.empty(rows, width, device=attn.device, dtype=attn.dtype)
        mean = torch.empty(rows, device=attn.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        dropout = dropout_p > 0.0
        token_keys, words, key_args, device_words = kernel_key_args(keys, dropout_p, attn.device)
        has_bias = bias is not None
        b = bias if has_bias else weight
        block_d, block_r = triton.next_power_of_2(width), _block_rows(width)
        if rows:
            _stu_output_fwd[(triton.cdiv(rows, block_r),)](
                x, g, weight, b, token_keys, words, y, mean, rstd, rows, groups, inner,
                x.stride(0), x.stride(1), g.stride(0), g.stride(1), eps, dropout_p, *key_args,
                BLOCK_R=block_r, BLOCK_D=block_d, HAS_BIAS=has_bias, DROPOUT=dropout, DEVICE_WORDS=device_words,
                num_warps=4,
            )
        ctx.save_for_backward(x, g, weight, b, token_keys, words)
        ctx.meta = (eps, dropout_p, has_bias, attn.shape, u.shape, key_args, device_words)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, g, weight, b, token_keys, words = ctx.saved_tensors
        eps, dropout_p, has_bias, attn_shape, u_shape, key_args, device_words = ctx.meta
        rows, groups, inner = x.shape
        width = groups * inner
        grad_y = grad_y.contiguous()
        dx = torch.empty(rows, width, device=x.device, dtype=x.dtype)
        du = torch.empty(rows, width, device=x.device, dtype=g.dtype)
        block_d, block_r = triton.next_power_of_2(width), _block_rows(width)
        programs = max(1, min(triton.cdiv(rows, block_r), multiprocessors(x.device) * 4))
        dw = torch.zeros(programs, width, device=x.device, dtype=torch.float32)
        db = torch.zeros_like(dw)
        if rows:
            _stu_output_bwd[(programs,)](
                x, g, weight, b, token_keys, words, grad_y, dx, du, dw, db, rows, groups, inner,
                x.stride(0), x.stride(1), g.stride(0), g.stride(1), eps, dropout_p, *key_args,
                BLOCK_R=block_r, BLOCK_D=block_d, HAS_BIAS=has_bias, DROPOUT=dropout_p > 0.0,
                DEVICE_WORDS=device_words, num_warps=4,
            )
        grad_bias = db.sum(0).to(b.dtype) if has_bias else None
        return dx.view(attn_shape), du.view(u_shape), dw.sum(0).to(weight.dtype), grad_bias, None, None, None


def triton_stu_output(
    attn: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    eps: float,
    dropout_p: float,
    training: bool,
    dropout_keys=None,
) -> torch.Tensor:
    return _STUOutput.apply(attn, u, weight, bias, eps, dropout_p if training else 0.0, dropout_keys)
