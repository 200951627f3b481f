"""The mHC mappings in Triton: per token the RMS of the ``n C`` stream values fused with the
projection to the ``W = n² + 2n`` logits, the gates and the sigmoids; H_res then goes
through :mod:`megatron_gr.ops.triton.mhc_sinkhorn`. Same semantics as
:func:`megatron_gr.ops.pytorch.mhc.pytorch_mhc_mappings`, all mapping math in float32.

Forward (one kernel): a program holds ``BLOCK_T`` tokens and walks their ``K = n C``
values in chunks, accumulating the squares (element-wise, reduced once at the end) and the
``[BLOCK_T, W]`` products with the projection in one pass over x, then applies
``1 / rms``, the gates, the bias and the sigmoids and writes H_pre, H_post and the H_res
logits. It also writes the logits before the gates, ``l = (P x) / rms`` ``[T, W]``, and
``1 / rms`` ``[T]`` (float32, about ``2 W / (n C)`` of bf16 x's bytes): with x, the only
tensors the backward keeps.

Backward (two kernels): a small one turns the upstream gradients into ``g = dl / rms``
``[T, W]`` and the RMS coefficient per token (and partial sums for the gate and bias
gradients); the main one walks x once more in ``[BLOCK_T, BLOCK_K]`` tiles, programs
spread over K chunks and token ranges, writing ``dx = g P - coef x`` and accumulating
``dP = gᵀ x`` per program (summed over the token ranges afterwards). Bytes: x read once
and dx written once (the floor), plus three ``WP``-wide bf16 rows of g per token (g_hi
for dx, g_hi and g_lo transposed for dP), read from L2 by each K chunk. Every product operand is loaded from memory in the orientation the product
needs (``gᵀ`` by a transposed load of g's rows), so Triton streams them into shared memory
(``cp.async``, pipelined) and no operand is transposed in registers.

Products with the float32 projection keep float32 precision: bf16 streams multiply
``P = P_hi + P_lo`` split into two bf16 halves (two bf16 tensor-core products; x is exact
in bf16), and likewise ``dP = (g_hi + g_lo)ᵀ x``; ``dx`` takes the one product
``g_hi P_hi`` (relative error ~2e-3, under the bf16 rounding of dx itself). Other dtypes
use Triton's ``tf32x3``. The interpreter upcasts (its bf16 dot is wrong in Triton 3.6).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_gr.ops.triton.availability import interpreter_enabled
from megatron_gr.ops.triton.mhc_configs import blocks, gate_block_tokens
from megatron_gr.ops.triton.multiprocessors import multiprocessors
from megatron_gr.ops.triton.mhc_sinkhorn import triton_sinkhorn


@triton.jit
def dot_acc(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` in float32: 16-bit operands are exact products with fp32 sums, fp32
    operands use ``PRECISION``."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _gates(w, n: tl.constexpr, W: tl.constexpr, Alpha, Bias):
    """Per logit column: its gate (alpha of its group: pre | post | res) and its bias."""
    group = tl.where(w < n, 0, tl.where(w < 2 * n, 1, 2))
    alpha = tl.load(Alpha + group).to(tl.float32)
    bias = tl.load(Bias + w, mask=w < W, other=0.0).to(tl.float32)
    return alpha, bias


@triton.jit(do_not_specialize=["num_tokens"])
def _mappings_fwd(X, PHi, PLo, Alpha, Bias, Pre, Post, ResLogits, Logits, InvRms, num_tokens, K, eps,
                  n: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    live = tokens < num_tokens
    rows = tokens.to(tl.int64)
    w = tl.arange(0, WP)
    acc = tl.zeros([BLOCK_T, WP], dtype=tl.float32)
    squares = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)  # reduced over K once, after the loop
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None] * K + k[None, :], mask=live[:, None] & (k < K)[None, :], other=0.0)
        xf = x.to(tl.float32)
        squares += xf * xf
        p_offsets = w[None, :] * K + k[:, None]  # [BLOCK_K, WP] of P [W, K]
        p_mask = (k < K)[:, None] & (w < W)[None, :]
        if SPLIT:
            acc = dot_acc(x, tl.load(PHi + p_offsets, mask=p_mask, other=0.0), acc, UPCAST, "tf32x3")
            acc = dot_acc(x, tl.load(PLo + p_offsets, mask=p_mask, other=0.0), acc, UPCAST, "tf32x3")
        else:
            acc = dot_acc(xf, tl.load(PHi + p_offsets, mask=p_mask, other=0.0).to(tl.float32), acc, UPCAST, "tf32x3")
    map_outputs(acc, tl.sum(squares, axis=1), K, eps, rows, live, Alpha, Bias, Pre, Post, ResLogits, Logits, InvRms,
                n, W, WP)


@triton.jit
def map_outputs(acc, sum_squares, K, eps, rows, live, Alpha, Bias, Pre, Post, ResLogits, Logits, InvRms,
                n: tl.constexpr, W: tl.constexpr, WP: tl.constexpr):
    """From a token tile's projections ``acc = P x`` ``[BLOCK_T, WP]`` and sums of squares
    over its ``K`` values: ``1 / rms``, the gates, the bias and the sigmoids; writes H_pre,
    H_post, the H_res logits, and the logits ``l`` and ``1 / rms`` the backward keeps."""
    w = tl.arange(0, WP)
    inv_rms = 1.0 / tl.sqrt(sum_squares / K + eps)
    logits = acc * inv_rms[:, None]
    alpha, bias = _gates(w, n, W, Alpha, Bias)
    z = logits * alpha[None, :] + bias[None, :]
    s = tl.sigmoid(z)
    live2 = live[:, None]
    col = w[None, :]
    tl.store(Logits + rows[:, None] * W + col, logits, mask=live2 & (col < W))
    tl.store(InvRms + rows, inv_rms, mask=live)
    tl.store(Pre + rows[:, None] * n + col, s, mask=live2 & (col < n))
    tl.store(Post + rows[:, None] * n + (col - n), 2.0 * s, mask=live2 & (col >= n) & (col < 2 * n))
    tl.store(ResLogits + rows[:, None] * (n * n) + (col - 2 * n), z, mask=live2 & (col >= 2 * n) & (col < W))


@triton.jit
def gates_tile(d_pre, DPost, DRes, Logits, InvRms, Alpha, Bias, GHi, GLo, Coef, DBiasPart, DAlphaPart,
               num_tokens, K, n: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, BLOCK_T: tl.constexpr,
               SPLIT: tl.constexpr):
    """Per token of this program's tile (``BLOCK_T`` tokens from ``program_id(0) BLOCK_T``),
    from the H_pre gradient ``d_pre`` ``[BLOCK_T, WP]`` (its first n columns, zero past
    them): dz (through the sigmoids), dl = alpha dz, g = dl / rms and
    coef = (dl . l) / (rms² K); per program: the sums of dz per logit (bias gradient) and of
    dz l per gate group (pre | post | res, padded to 4: gate gradient).
    g ``[T, WP]`` (zero past W) goes to ``GHi`` in its dtype; with SPLIT, ``GHi`` and ``GLo``
    are bf16 and hold ``g = hi + lo`` to about 2^-16, the operands of exact bf16 products."""
    pid = tl.program_id(0)
    tokens = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    live = (tokens < num_tokens)[:, None]
    rows = tokens.to(tl.int64)[:, None]
    w = tl.arange(0, WP)
    col = w[None, :]
    logits = tl.load(Logits + rows * W + col, mask=live & (col < W), other=0.0)
    inv_rms = tl.load(InvRms + tokens, mask=tokens < num_tokens, other=0.0)
    alpha, bias = _gates(w, n, W, Alpha, Bias)
    s = tl.sigmoid(logits * alpha[None, :] + bias[None, :])
    d_post = tl.load(DPost + rows * n + (col - n), mask=live & (col >= n) & (col < 2 * n), other=0.0)
    d_res = tl.load(DRes + rows * (n * n) + (col - 2 * n), mask=live & (col >= 2 * n) & (col < W), other=0.0)
    dz = tl.where(col < n, d_pre * s * (1.0 - s), tl.where(col < 2 * n, 2.0 * d_post * s * (1.0 - s), d_res))
    dz = tl.where(live & (col < W), dz, 0.0)
    dl = dz * alpha[None, :]
    g = dl * inv_rms[:, None]
    g_hi = g.to(GHi.dtype.element_ty)
    tl.store(GHi + rows * WP + col, g_hi, mask=live)
    if SPLIT:
        tl.store(GLo + rows * WP + col, (g - g_hi.to(tl.float32)).to(GLo.dtype.element_ty), mask=live)
    coef = tl.sum(dl * logits, axis=1) * (inv_rms * inv_rms / K)
    tl.store(Coef + tokens, coef, mask=tokens < num_tokens)
    tl.store(DBiasPart + pid * WP + w, tl.sum(dz, axis=0))
    group = tl.where(w < n, 0, tl.where(w < 2 * n, 1, 2))  # logits past W hold dz = 0
    q = tl.arange(0, 4)
    per_group = tl.where(group[None, :] == q[:, None], tl.sum(dz * logits, axis=0)[None, :], 0.0)
    tl.store(DAlphaPart + pid * 4 + q, tl.sum(per_group, axis=1))


@triton.jit(do_not_specialize=["num_tokens"])
def _mappings_bwd_gates(DPre, DPost, DRes, Logits, InvRms, Alpha, Bias, GHi, GLo, Coef, DBiasPart, DAlphaPart,
                        num_tokens, K, n: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, BLOCK_T: tl.constexpr,
                        SPLIT: tl.constexpr):
    """:func:`gates_tile` with the H_pre gradient from ``DPre`` ``[T, n]``."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    col = tl.arange(0, WP)[None, :]
    d_pre = tl.load(DPre + tokens.to(tl.int64)[:, None] * n + col, mask=(tokens < num_tokens)[:, None] & (col < n),
                    other=0.0)
    gates_tile(d_pre, DPost, DRes, Logits, InvRms, Alpha, Bias, GHi, GLo, Coef, DBiasPart, DAlphaPart, num_tokens, K,
               n, W, WP, BLOCK_T, SPLIT)


@triton.jit(do_not_specialize=["num_tokens"])
def _mappings_bwd_x(X, P, GHi, GLo, Coef, Pre, Grad, DX, DPPart, num_tokens, K, C,
                    n: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                    SPLIT: tl.constexpr, UPCAST: tl.constexpr, AGGREGATE: tl.constexpr, WHOLE_CHUNKS: tl.constexpr):
    """``dx = g P - coef x`` for one K chunk of a range of token tiles; ``gᵀ x`` summed over
    them into this program's slot of the projection gradient. Every matrix operand comes
    straight from memory in the orientation its product needs (``gᵀ`` by a transposed
    load of the small g rows, no transpose of registers). With ``AGGREGATE`` (the fused
    pre op) dx also takes the aggregate's ``h_pre[t, i] du[t, c]`` (``Pre`` ``[T, n]``,
    ``Grad`` ``[T, C]``, flattened value k in stream ``k // C``): one dx for both."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = (k < K)[None, :]
    w = tl.arange(0, WP)
    p = tl.load(P + w[:, None] * K + k[None, :], mask=(w < W)[:, None] & k_mask, other=0.0)  # [WP, BLOCK_K]
    dp = tl.zeros([WP, BLOCK_K], dtype=tl.float32)
    # the chunk's stream: one per chunk when chunks tile the channels (C a multiple of
    # BLOCK_K; then H_pre is one value per token), else per value
    if WHOLE_CHUNKS:
        stream = (tl.program_id(0) * BLOCK_K) // C
    else:
        stream = k // C
    channel = k - stream * C
    for tile in range(tl.program_id(1), tl.cdiv(num_tokens, BLOCK_T), tl.num_programs(1)):
        tokens = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        live = tokens < num_tokens
        rows = tokens.to(tl.int64)
        x = tl.load(X + rows[:, None] * K + k[None, :], mask=live[:, None] & k_mask, other=0.0)
        g = tl.load(GHi + rows[:, None] * WP + w[None, :], mask=live[:, None], other=0.0)  # [BLOCK_T, WP]
        coef = tl.load(Coef + tokens, mask=live, other=0.0)
        g_t = tl.load(GHi + rows[None, :] * WP + w[:, None], mask=live[None, :], other=0.0)  # [WP, BLOCK_T]
        # bf16 streams: one bf16 product of g's and P's high halves, ~2e-3 relative, under
        # the bf16 rounding of dx itself; float32 streams: tf32x3
        dx = dot_acc(g, p, tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32), UPCAST, "tf32x3")
        dx -= coef[:, None] * x.to(tl.float32)
        if AGGREGATE:
            token_mask = live[:, None] & k_mask
            if WHOLE_CHUNKS:
                h = tl.load(Pre + rows * n + stream, mask=live, other=0.0)[:, None]
            else:
                h = tl.load(Pre + rows[:, None] * n + stream[None, :], mask=token_mask, other=0.0)
            du = tl.load(Grad + rows[:, None] * C + channel[None, :], mask=token_mask, other=0.0)
            dx += h * du.to(tl.float32)
        tl.store(DX + rows[:, None] * K + k[None, :], dx.to(DX.dtype.element_ty), mask=live[:, None] & k_mask)
        dp = dot_acc(g_t, x, dp, UPCAST, "tf32x3")
        if SPLIT:
            g_t = tl.load(GLo + rows[None, :] * WP + w[:, None], mask=live[None, :], other=0.0)
            dp = dot_acc(g_t, x, dp, UPCAST, "tf32x3")
    slot = DPPart + tl.program_id(1).to(tl.int64) * W * K
    tl.store(slot + w[:, None] * K + k[None, :], dp, mask=(w < W)[:, None] & k_mask)


def mapping_params(projection, alpha, bias, *, split: bool):
    """The map parameters as the kernels read them: ``(p32, p_hi, p_lo, alpha32, bias32)``,
    float32, with the projection also as two bf16 halves ``p32 = p_hi + p_lo`` when
    ``split`` (bf16 streams; else ``p_hi`` and ``p_lo`` are ``p32``)."""
    f32 = torch.float32
    p32 = projection.detach().to(f32).contiguous()
    p_hi = p32.to(torch.bfloat16) if split else p32
    p_lo = (p32 - p_hi.to(f32)).to(torch.bfloat16) if split else p32
    return p32, p_hi, p_lo, alpha.detach().to(f32).contiguous(), bias.detach().to(f32).contiguous()


def map_buffers(num_tokens: int, n: int, device):
    """What the maps' forward writes: ``(h_pre, h_post, res_logits, logits, inv_rms)``, float32."""
    f32 = torch.float32
    pre = torch.empty(num_tokens, n, device=device, dtype=f32)
    return (pre, torch.empty_like(pre), torch.empty(num_tokens, n, n, device=device, dtype=f32),
            torch.empty(num_tokens, n * n + 2 * n, device=device, dtype=f32),
            torch.empty(num_tokens, device=device, dtype=f32))


def mappings_forward(x, projection, alpha, bias, eps, *, streams=None):
    """The forward kernel on contiguous values x ``[T, S, C]`` (``S C`` per token, the
    projection's width): ``(h_pre, h_post, res_logits)`` of ``streams`` residual streams
    (default S) and what the backward keeps besides x, ``(p32, alpha32, bias32, logits,
    inv_rms)`` (float32). ``streams`` differs from S for the block input standing for n
    copies of itself (x ``[T, 1, C]`` with the column-summed projection)."""
    num_tokens, K = x.shape[0], x.shape[1] * x.shape[2]
    n = streams or x.shape[1]
    W = n * n + 2 * n
    WP = max(16, triton.next_power_of_2(W))
    split = x.dtype == torch.bfloat16
    p32, p_hi, p_lo, alpha32, bias32 = mapping_params(projection, alpha, bias, split=split)
    pre, post, res, logits, inv_rms = map_buffers(num_tokens, n, x.device)
    cfg = blocks("mappings_fwd", streams=n, dtype=x.dtype)
    if num_tokens:
        _mappings_fwd[(triton.cdiv(num_tokens, cfg.block_t),)](
            x, p_hi, p_lo, alpha32, bias32, pre, post, res, logits, inv_rms, num_tokens, K, eps,
            n=n, W=W, WP=WP, BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_c, SPLIT=split,
            UPCAST=interpreter_enabled(), num_warps=cfg.num_warps,
        )
    return (pre, post, res), (p32, alpha32, bias32, logits, inv_rms)


def gate_buffers(num_tokens: int, WP: int, tiles: int, split: bool, device):
    """g's halves ``[T, WP]``, coef ``[T]`` and the per-program partial sums of the bias and
    gate gradients that the gates kernel writes."""
    f32 = torch.float32
    g_hi = torch.empty(num_tokens, WP, device=device, dtype=torch.bfloat16 if split else f32)
    g_lo = torch.empty_like(g_hi) if split else g_hi
    coef = torch.empty(num_tokens, device=device, dtype=f32)
    alloc = torch.empty if num_tokens else torch.zeros  # the kernel writes every slot; with no tokens it does not run
    return g_hi, g_lo, coef, alloc(tiles, WP, device=device, dtype=f32), alloc(tiles, 4, device=device, dtype=f32)


def projection_backward(x, p32, g_hi, g_lo, coef, *, pre=None, grad=None, streams=None):
    """``(dx, dP)`` from g and coef (:func:`gates_tile`); with ``pre`` ``[T, S]`` and
    ``grad`` ``[T, C]`` dx also takes the aggregate's ``h_pre ⊗ du``. x ``[T, S, C]``, P
    ``[n² + 2n, S C]`` for ``streams`` = n residual streams (default S; the block input,
    S = 1, stands for n)."""
    num_tokens, n, channels = x.shape
    streams = streams or n
    K, W = n * channels, streams * streams + 2 * streams
    WP = g_hi.shape[1]
    cfg = blocks("mappings_bwd", streams=streams, dtype=x.dtype)
    dx = torch.empty_like(x)
    k_chunks = triton.cdiv(K, cfg.block_c)
    token_ranges = max(1, min(triton.cdiv(num_tokens, cfg.block_t), 4 * multiprocessors(x.device) // k_chunks))
    alloc = torch.empty if num_tokens else torch.zeros
    dp_part = alloc(token_ranges, W, K, device=x.device, dtype=torch.float32)
    aggregate = pre is not None
    if num_tokens:
        _mappings_bwd_x[(k_chunks, token_ranges)](
            x, p32.to(g_hi.dtype), g_hi, g_lo, coef, pre if aggregate else coef, grad if aggregate else x, dx, dp_part,
            num_tokens, K, channels, n=n, W=W, WP=WP, BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_c,
            SPLIT=x.dtype == torch.bfloat16, UPCAST=interpreter_enabled(), AGGREGATE=aggregate,
            WHOLE_CHUNKS=channels % cfg.block_c == 0, num_warps=cfg.num_warps,
        )
    return dx, dp_part.sum(0)


class _Mappings(torch.autograd.Function):
    """``(h_pre, h_post, res_logits)`` from the streams; Sinkhorn is applied by the caller."""

    @staticmethod
    def forward(ctx, x, projection, alpha, bias, eps):
        x = x.contiguous()
        maps, saved = mappings_forward(x, projection, alpha, bias, eps)
        ctx.save_for_backward(x, *saved)
        ctx.dtypes = (projection.dtype, alpha.dtype, bias.dtype)
        return maps

    @staticmethod
    def backward(ctx, d_pre, d_post, d_res):
        x, p32, alpha32, bias32, logits, inv_rms = ctx.saved_tensors
        num_tokens, n, channels = x.shape
        K, W = n * channels, n * n + 2 * n
        WP = max(16, triton.next_power_of_2(W))
        d_pre, d_post = as_float32(d_pre, (num_tokens, n), x.device), as_float32(d_post, (num_tokens, n), x.device)
        d_res = as_float32(d_res, (num_tokens, n, n), x.device)
        split = x.dtype == torch.bfloat16
        gate_block = gate_block_tokens(n)
        tiles = max(1, triton.cdiv(num_tokens, gate_block))
        g_hi, g_lo, coef, d_bias_part, d_alpha_part = gate_buffers(num_tokens, WP, tiles, split, x.device)
        if num_tokens:
            _mappings_bwd_gates[(tiles,)](
                d_pre, d_post, d_res, logits, inv_rms, alpha32, bias32, g_hi, g_lo, coef, d_bias_part, d_alpha_part,
                num_tokens, K, n=n, W=W, WP=WP, BLOCK_T=gate_block, SPLIT=split, num_warps=4,
            )
        dx, dp = projection_backward(x, p32, g_hi, g_lo, coef)
        p_dtype, alpha_dtype, bias_dtype = ctx.dtypes
        d_alpha, d_bias = d_alpha_part.sum(0)[:3], d_bias_part.sum(0)[:W]
        return dx, dp.to(p_dtype), d_alpha.to(alpha_dtype), d_bias.to(bias_dtype), None


def as_float32(grad, shape, device):
    """An output's gradient as a contiguous float32 tensor (zeros when autograd gives None)."""
    if grad is None:
        return torch.zeros(shape, device=device, dtype=torch.float32)
    return grad.to(torch.float32).contiguous()


def triton_mhc_mappings(x, projection, alpha, bias, *, iterations: int, eps: float):
    """Same semantics as :func:`megatron_gr.ops.pytorch.mhc.pytorch_mhc_mappings` for
    float32, bfloat16 or float16 streams and float32 parameters."""
    pre, post, res_logits = _Mappings.apply(x, projection, alpha, bias, eps)
    return pre, post, triton_sinkhorn(res_logits, iterations)
