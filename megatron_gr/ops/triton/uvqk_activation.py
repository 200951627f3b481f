"""Fused UVQK activation in Triton: ``u, v, q, k = split(SiLU(x + b))`` per head.

Forward: one pass reads the projection ``x`` and writes the four pieces as separate
``[T, heads, d]`` tensors. Backward: one pass reads the four gradients (any row and head
strides: the attention and output-gate backward write them separately, so nothing is
concatenated), recomputes the SiLU from ``x`` and writes ``dx``; each program keeps a
float32 partial sum of the bias gradient over its rows (summed by the caller, a fixed
order: deterministic).

A program covers a block of rows and a block of one head's columns; a column block that
spans several pieces stores (loads) each under its own mask.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from megatron_gr.ops.triton.multiprocessors import multiprocessors


@triton.jit
def _pieces(w, DV: tl.constexpr, DQK: tl.constexpr):
    """Masks of the u, v, q, k columns among a head's columns ``w`` and each one's index in its piece."""
    in_u = w < DV
    in_v = (w >= DV) & (w < 2 * DV)
    in_q = (w >= 2 * DV) & (w < 2 * DV + DQK)
    in_k = (w >= 2 * DV + DQK) & (w < 2 * DV + 2 * DQK)
    local = tl.where(in_u, w, tl.where(in_v, w - DV, tl.where(in_q, w - 2 * DV, w - 2 * DV - DQK)))
    return in_u, in_v, in_q, in_k, local


@triton.jit
def _pre_activation(X, B, rows, cols, rmask, cmask, stride_x, HAS_BIAS: tl.constexpr):
    mask = rmask[:, None] & cmask[None, :]
    # 64-bit offsets: T x N passes 2^31 elements at about 524k tokens of width 4096.
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return x, mask


@triton.jit(do_not_specialize=["R"])
def _uvqk_fwd(X, B, U, V, Q, K, R, stride_x, su_r, su_h, sv_r, sv_h, sq_r, sq_h, sk_r, sk_h,
              DV: tl.constexpr, DQK: tl.constexpr, HAS_BIAS: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    w = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    width: tl.constexpr = 2 * DV + 2 * DQK
    rmask, wmask = rows < R, w < width
    x, mask = _pre_activation(X, B, rows, head * width + w, rmask, wmask, stride_x, HAS_BIAS)
    y = x / (1.0 + tl.exp(-x))
    in_u, in_v, in_q, in_k, local = _pieces(w, DV, DQK)
    r = rows[:, None].to(tl.int64)
    c = local[None, :]
    tl.store(U + r * su_r + head * su_h + c, y.to(U.dtype.element_ty), mask=mask & in_u[None, :])
    tl.store(V + r * sv_r + head * sv_h + c, y.to(V.dtype.element_ty), mask=mask & in_v[None, :])
    tl.store(Q + r * sq_r + head * sq_h + c, y.to(Q.dtype.element_ty), mask=mask & in_q[None, :])
    tl.store(K + r * sk_r + head * sk_h + c, y.to(K.dtype.element_ty), mask=mask & in_k[None, :])


@triton.jit(do_not_specialize=["R"])
def _uvqk_bwd(X, B, DU, DV_, DQ, DK, DX, DB, R, N, stride_x, su_r, su_h, sv_r, sv_h, sq_r, sq_h, sk_r, sk_h,
              DV: tl.constexpr, DQK: tl.constexpr, HAS_BIAS: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    w = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    width: tl.constexpr = 2 * DV + 2 * DQK
    wmask = w < width
    cols = head * width + w
    in_u, in_v, in_q, in_k, local = _pieces(w, DV, DQK)
    c = local[None, :]
    db = tl.zeros([BLOCK_W], dtype=tl.float32)
    # Persistent over row blocks: one partial bias-gradient sum per program.
    for start in range(pid * BLOCK_R, R, tl.num_programs(0) * BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        x, mask = _pre_activation(X, B, rows, cols, rows < R, wmask, stride_x, HAS_BIAS)
        r = rows[:, None].to(tl.int64)
        g = tl.load(DU + r * su_r + head * su_h + c, mask=mask & in_u[None, :], other=0.0).to(tl.float32)
        g += tl.load(DV_ + r * sv_r + head * sv_h + c, mask=mask & in_v[None, :], other=0.0).to(tl.float32)
        g += tl.load(DQ + r * sq_r + head * sq_h + c, mask=mask & in_q[None, :], other=0.0).to(tl.float32)
        g += tl.load(DK + r * sk_r + head * sk_h + c, mask=mask & in_k[None, :], other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-x))
        dpre = g * s * (1.0 + x * (1.0 - s))
        tl.store(DX + r * stride_x + cols[None, :], dpre.to(DX.dtype.element_ty), mask=mask)
        db += tl.sum(dpre, 0)
    tl.store(DB + pid * N + cols, db, mask=wmask)


def _blocks(width: int) -> tuple[int, int]:
    """(rows, columns) per program: 128 columns (a whole piece's block when 128 divides the
    head dims) by 32 rows; narrower heads take all their columns and 4096 elements' rows."""
    block_w = min(128, triton.next_power_of_2(width))
    return max(1, 4096 // block_w) if block_w < 128 else 32, block_w


def _row_strides(t: torch.Tensor) -> tuple[int, int]:
    return t.stride(0), t.stride(1)


class _UVQKActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, heads, split_sizes):
        dv, _, dqk, _ = split_sizes
        rows, width = x.shape[0], dv * 2 + dqk * 2
        # Packed rows: dx is written with x's row stride.
        x = x if x.is_contiguous() else x.contiguous()
        bias = bias.contiguous() if bias is not None else None
        outs = [torch.empty(rows, heads, d, device=x.device, dtype=x.dtype) for d in split_sizes]
        has_bias = bias is not None
        b = bias if has_bias else x
        block_r, block_w = _blocks(width)
        if rows:
            strides = [s for t in outs for s in _row_strides(t)]
            _uvqk_fwd[(triton.cdiv(rows, block_r), heads, triton.cdiv(width, block_w))](
                x, b, *outs, rows, x.stride(0), *strides, DV=dv, DQK=dqk, HAS_BIAS=has_bias,
                BLOCK_R=block_r, BLOCK_W=block_w, num_warps=4,
            )
        ctx.save_for_backward(x, bias)
        ctx.meta = (heads, split_sizes)
        return tuple(outs)

    @staticmethod
    def backward(ctx, du, dv_, dq, dk):
        x, bias = ctx.saved_tensors
        heads, split_sizes = ctx.meta
        dv, _, dqk, _ = split_sizes
        rows, n = x.shape
        width = n // heads
        grads = [g if g.stride(-1) == 1 else g.contiguous() for g in (du, dv_, dq, dk)]
        block_r, block_w = _blocks(width)
        column_programs = heads * triton.cdiv(width, block_w)
        programs = max(1, min(triton.cdiv(rows, block_r), triton.cdiv(multiprocessors(x.device) * 8, column_programs)))
        dx = torch.empty_like(x)
        # Every program writes its partial sum of every column (no zero fill needed).
        db = (torch.empty if rows else torch.zeros)(programs, n, device=x.device, dtype=torch.float32)
        if rows:
            strides = [s for g in grads for s in _row_strides(g)]
            _uvqk_bwd[(programs, heads, triton.cdiv(width, block_w))](
                x, bias if bias is not None else x, *grads, dx, db, rows, n, x.stride(0), *strides,
                DV=dv, DQK=dqk, HAS_BIAS=bias is not None, BLOCK_R=block_r, BLOCK_W=block_w, num_warps=4,
            )
        grad_bias = db.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[1] else None
        return dx, grad_bias, None, None


def triton_uvqk_activation(x: torch.Tensor, bias: Optional[torch.Tensor], *, heads: int, split_sizes: tuple):
    return _UVQKActivation.apply(x, bias, heads, split_sizes)
