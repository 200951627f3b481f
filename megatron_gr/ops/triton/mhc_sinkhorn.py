"""Sinkhorn-Knopp of ``exp(logits)`` ``[T, n, n]`` in Triton, one token's matrix per row of a
``[BLOCK_T, N, N]`` register tile (N: n rounded up to a power of two, padding masked to 0).

The math is the reference's (:func:`megatron_gr.ops.pytorch.mhc._sinkhorn_steps`): a first
round in log space, then ``iterations - 1`` rounds that divide rows and columns by their
sums (floored at 1e-30). The forward reads the logits once and writes the result once.

Only the logits are kept for the backward. Walking a round back needs its row and column
sums and its output, so the backward kernel replays the iterations on chip in segments of
``SEGMENT`` rounds, last segment first: it replays from the first round up to the
segment's start (a loop with a run-time count), runs the segment keeping its sums in
registers (the segment is unrolled and its sums are a tuple of tiles: no dynamically
indexed storage), then walks the segment back, rebuilding each round's input as output
times sums (as the reference does). About ``rounds² / (2 SEGMENT)`` extra round replays,
a few multiply-adds per matrix entry each, buy a backward that writes nothing but the
gradient. Up to 4 streams a thread holds whole matrices, so no sum leaves a thread.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_gr.ops.triton.mhc_configs import sinkhorn_block_tokens


@triton.jit
def _first_round(logits, valid):
    """The log-space first round. Returns (its output, exp of the row-normalised logits).
    A logsumexp's sum of exponentials is >= 1 (its largest term is exp(0)), so the floor of
    1 only turns padded rows and columns (sum 0) into finite zeros."""
    lm = tl.where(valid, logits, float("-inf"))
    top = tl.max(lm, axis=2)
    top = tl.where(top == float("-inf"), 0.0, top)  # padded rows
    row_lse = tl.log(tl.maximum(tl.sum(tl.exp(lm - top[:, :, None]), axis=2), 1.0)) + top
    z_row = tl.where(valid, logits - row_lse[:, :, None], float("-inf"))
    top = tl.max(z_row, axis=1)
    top = tl.where(top == float("-inf"), 0.0, top)  # padded columns
    col_lse = tl.log(tl.maximum(tl.sum(tl.exp(z_row - top[:, None, :]), axis=1), 1.0)) + top
    m_first = tl.where(valid, tl.exp(z_row - col_lse[:, None, :]), 0.0)
    return m_first, tl.where(valid, tl.exp(z_row), 0.0)


@triton.jit
def _round(m):
    """One row then one column normalisation; returns (result, row sums, column sums)."""
    row = tl.maximum(tl.sum(m, axis=2), 1e-30)  # [BLOCK_T, N] over i
    m = m / row[:, :, None]
    col = tl.maximum(tl.sum(m, axis=1), 1e-30)  # [BLOCK_T, N] over j
    return m / col[:, None, :], row, col


@triton.jit
def _tile(num_tokens, n: tl.constexpr, N: tl.constexpr, BLOCK_T: tl.constexpr):
    """The program's first matrix entry (int64, added to the pointers once) and the int32
    offsets and mask of its ``[BLOCK_T, N, N]`` tile from there."""
    first = tl.program_id(0).to(tl.int64) * (BLOCK_T * n * n)
    t = tl.arange(0, BLOCK_T)
    i = tl.arange(0, N)
    valid = (tl.program_id(0) * BLOCK_T + t < num_tokens)[:, None, None] & (i < n)[None, :, None] & (i < n)[None, None, :]
    offsets = t[:, None, None] * (n * n) + i[None, :, None] * n + i[None, None, :]
    return first, offsets, valid


@triton.jit(do_not_specialize=["num_tokens"])
def _sinkhorn_fwd(Logits, Out, num_tokens, iterations,
                  n: tl.constexpr, N: tl.constexpr, BLOCK_T: tl.constexpr):
    first, offsets, valid = _tile(num_tokens, n, N, BLOCK_T)
    logits = tl.load(Logits + first + offsets, mask=valid, other=0.0).to(tl.float32)
    m, _ = _first_round(logits, valid)
    for _ in range(iterations - 1):
        m, _, _ = _round(m)
    tl.store(Out + first + offsets, m, mask=valid)


@triton.jit(do_not_specialize=["num_tokens"])
def _sinkhorn_bwd(Logits, Grad, GradLogits, num_tokens, iterations,
                  n: tl.constexpr, N: tl.constexpr, BLOCK_T: tl.constexpr, SEGMENT: tl.constexpr):
    first, offsets, valid = _tile(num_tokens, n, N, BLOCK_T)
    logits = tl.load(Logits + first + offsets, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(Grad + first + offsets, mask=valid, other=0.0).to(tl.float32)
    m_first, e_row = _first_round(logits, valid)
    rounds = iterations - 1
    for back in range(tl.cdiv(rounds, SEGMENT)):  # segments last to first
        start = (tl.cdiv(rounds, SEGMENT) - 1 - back) * SEGMENT
        m = m_first
        for _ in range(start):  # replay up to the segment (a run-time count: nothing to unroll)
            m, _, _ = _round(m)
        # the segment, unrolled: its sums in registers (a tuple); rounds past the last
        # (a short final segment) leave m and g as they are
        rows = ()
        cols = ()
        for k in tl.static_range(SEGMENT):
            live = start + k < rounds
            m_next, row, col = _round(m)
            m = tl.where(live, m_next, m)
            rows = rows + (row,)
            cols = cols + (col,)
        for kk in tl.static_range(SEGMENT):  # the segment's rounds, last to first
            live = start + SEGMENT - 1 - kk < rounds
            row, col = rows[SEGMENT - 1 - kk], cols[SEGMENT - 1 - kk]
            # through m' = m / col (m' is the round's output): g = (g - sum_i g m') / col
            g_col = (g - tl.sum(g * m, axis=1)[:, None, :]) / col[:, None, :]
            if n < N:  # padded columns have sums of 1e-30: keep their g at 0
                g_col = tl.where(valid, g_col, 0.0)
            m_col = m * col[:, None, :]
            g_row = (g_col - tl.sum(g_col * m_col, axis=2)[:, :, None]) / row[:, :, None]
            if n < N:
                g_row = tl.where(valid, g_row, 0.0)
            g = tl.where(live, g_row, g)
            m = tl.where(live, m_col * row[:, :, None], m)
    g = g * m_first  # through the exp of the first round
    g = g - m_first * tl.sum(g, axis=1)[:, None, :]  # its log-space column step
    g = g - e_row * tl.sum(g, axis=2)[:, :, None]  # its log-space row step
    tl.store(GradLogits + first + offsets, g.to(GradLogits.dtype.element_ty), mask=valid)


# Rounds whose sums the backward keeps in registers (a tuple, unrolled). The replays cost
# about rounds² / (2 SEGMENT) rounds: 45 for 20 iterations; 8 would halve that, but at one
# 4 x 4 matrix per thread it takes all 255 registers.
SEGMENT = 4


def sinkhorn_forward(logits: torch.Tensor, iterations: int) -> torch.Tensor:
    """The forward kernel on contiguous ``logits`` ``[T, n, n]``: the float32 result."""
    num_tokens, n, _ = logits.shape
    out = torch.empty(logits.shape, device=logits.device, dtype=torch.float32)
    block = sinkhorn_block_tokens(n, backward=False)
    if num_tokens:
        _sinkhorn_fwd[(triton.cdiv(num_tokens, block),)](
            logits, out, num_tokens, iterations, n=n, N=triton.next_power_of_2(n), BLOCK_T=block, num_warps=4,
        )
    return out


def sinkhorn_backward(logits: torch.Tensor, grad: torch.Tensor, iterations: int) -> torch.Tensor:
    """The backward kernel: the gradient of the logits (their dtype) from the forward's
    contiguous ``logits`` and the result's gradient ``grad``."""
    num_tokens, n, _ = logits.shape
    grad_logits = torch.empty_like(logits)
    block = sinkhorn_block_tokens(n, backward=True)
    if num_tokens:
        _sinkhorn_bwd[(triton.cdiv(num_tokens, block),)](
            logits, grad.contiguous(), grad_logits, num_tokens, iterations,
            n=n, N=triton.next_power_of_2(n), BLOCK_T=block, SEGMENT=SEGMENT, num_warps=4,
        )
    return grad_logits


class _Sinkhorn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, iterations: int) -> torch.Tensor:
        logits = logits.contiguous()
        ctx.iterations = iterations
        ctx.save_for_backward(logits)
        return sinkhorn_forward(logits, iterations)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (logits,) = ctx.saved_tensors
        return sinkhorn_backward(logits, grad, ctx.iterations), None


def triton_sinkhorn(logits: torch.Tensor, iterations: int) -> torch.Tensor:
    """Same semantics as :func:`megatron_gr.ops.pytorch.mhc.pytorch_sinkhorn` for float32,
    bfloat16 or float16 logits; returns float32."""
    return _Sinkhorn.apply(logits, iterations)
