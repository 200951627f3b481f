"""Reference manifold-constrained hyper-connections (mHC, arXiv 2512.24880), one token at a
time in spirit, written with whole-tensor ops.

For the ``n`` residual streams ``x`` ``[n, C]`` of a token, flattened to ``x⃗`` ``[n C]``:

    r        = sqrt(mean(x⃗²) + eps)                       RMS of the whole token
    l        = (P x⃗) / r                                   P: [n² + 2n, n C], rows pre | post | res
    H_pre    = sigmoid(alpha_pre  * l_pre  + b_pre)        [n]
    H_post   = 2 sigmoid(alpha_post * l_post + b_post)     [n]
    H_res    = Sinkhorn(alpha_res * l_res + b_res)         [n, n], doubly stochastic

    aggregate:  u      = sum_i H_pre[i] x[i]                          [C], the sublayer input
    pre:        (u, H_post, H_res), the mappings then the aggregate, H_pre used only by it
    merge:      x'[i]  = sum_j H_res[i, j] x[j] + H_post[i] dropout(y + b)   y: sublayer output,
                dropout keyed (:mod:`megatron_gr.ops.pytorch.keyed_dropout`), one mask per token

The RMS division follows the projection (the paper's reordering): the same numbers, and P x⃗
needs one pass over x. The norm has no weight of its own: one would multiply the columns of
P and add nothing. Mapping math runs in float32 for half-precision inputs (float64 stays
float64, for gradient checks); aggregate and merge return the dtype of ``x``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_gr.ops.pytorch.keyed_dropout import pytorch_keyed_dropout


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


# Floor of the row and column sums in the direct iterations. Sums only get this small when
# every entry of a row underflowed (independent logits spread by hundreds); the floor keeps
# such rows at 0 instead of 0/0, and 1/floor finite in the backward.
_SUM_FLOOR = 1e-30


def _sinkhorn_steps(logits: torch.Tensor, iterations: int, sums: Optional[list] = None):
    """Sinkhorn-Knopp of ``exp(logits)``: ``iterations`` rounds of a row then a column
    normalisation. The first round runs in log space (subtracting logsumexps), which removes
    any row and column offsets, however large, without overflow; after it every entry is at
    most 1 and every column sums to 1, so the remaining rounds divide by plain sums, a few
    cheap ops each. Returns ``(m, z_row, m_first)``: the result, the logits after the first
    row step and the matrix after the first round; appends each later round's row and
    column sums to ``sums`` when given."""
    z_row = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    m = m_first = (z_row - torch.logsumexp(z_row, dim=-2, keepdim=True)).exp()
    for _ in range(iterations - 1):
        row = m.sum(dim=-1, keepdim=True).clamp_min(_SUM_FLOOR)  # [T, n, 1]
        m = m / row
        col = m.sum(dim=-2, keepdim=True).clamp_min(_SUM_FLOOR)  # [T, 1, n]
        m = m / col
        if sums is not None:
            sums.append((row, col))
    return m, z_row, m_first


class _Sinkhorn(torch.autograd.Function):
    """Saves only the logits; the backward replays the forward, keeping the row and column
    sums of every round (``[T, n]`` each) but no intermediate matrix, and walks back.

    Through ``m' = m / sum(m)`` (over rows or columns) the gradient is
    ``g_m = (g' - sum(g' * m')) / sum(m)`` over the same axis, so each round needs its own
    output, rebuilt backwards as ``m = m' * sum(m)``. Through the log-space first round,
    ``z' = z - logsumexp(z)``, it is ``g_z = g' - exp(z') * sum(g')``.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iterations: int) -> torch.Tensor:
        ctx.iterations = iterations
        ctx.save_for_backward(logits)
        return _sinkhorn_steps(logits.to(_compute_dtype(logits)), iterations)[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (logits,) = ctx.saved_tensors
        compute = _compute_dtype(logits, grad)
        sums = []
        m, z_row, m_first = _sinkhorn_steps(logits.to(compute), ctx.iterations, sums)
        g = grad.to(compute)
        for row, col in reversed(sums):
            g = (g - (g * m).sum(dim=-2, keepdim=True)) / col  # column step; m is its output
            m = m * col
            g = (g - (g * m).sum(dim=-1, keepdim=True)) / row  # row step
            m = m * row
        g = g * m_first  # through exp of the first round's log-space result
        g = g - m_first * g.sum(dim=-2, keepdim=True)  # its column step
        g = g - z_row.exp() * g.sum(dim=-1, keepdim=True)  # its row step
        return g.to(logits.dtype), None


def pytorch_sinkhorn(logits: torch.Tensor, iterations: int) -> torch.Tensor:
    return _Sinkhorn.apply(logits, iterations)


def pytorch_mhc_mappings(
    x: torch.Tensor,
    projection: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor,
    *,
    iterations: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_tokens, n, _ = x.shape
    compute = _compute_dtype(x, projection, alpha, bias)
    flat = x.reshape(num_tokens, -1).to(compute)  # [T, n C]
    inv_rms = torch.rsqrt(flat.pow(2).mean(dim=-1, keepdim=True) + eps)  # [T, 1]
    logits = F.linear(flat, projection.to(compute)) * inv_rms  # [T, n² + 2n]
    alpha, bias = alpha.to(compute), bias.to(compute)
    pre = logits[:, :n] * alpha[0] + bias[:n]
    post = logits[:, n : 2 * n] * alpha[1] + bias[n : 2 * n]
    res = (logits[:, 2 * n :] * alpha[2] + bias[2 * n :]).view(num_tokens, n, n)
    return torch.sigmoid(pre), 2.0 * torch.sigmoid(post), pytorch_sinkhorn(res, iterations)


def pytorch_mhc_aggregate(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    compute = _compute_dtype(x, h_pre)
    return torch.einsum("tn,tnc->tc", h_pre.to(compute), x.to(compute)).to(x.dtype)


def pytorch_mhc_pre(
    x: torch.Tensor,
    projection: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor,
    *,
    iterations: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h_pre, h_post, h_res = pytorch_mhc_mappings(x, projection, alpha, bias, iterations=iterations, eps=eps)
    return pytorch_mhc_aggregate(x, h_pre), h_post, h_res


def pytorch_mhc_merge(
    x: torch.Tensor,
    h_res: torch.Tensor,
    h_post: torch.Tensor,
    y: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    dropout_p: float,
    training: bool,
    dropout_keys=None,
) -> torch.Tensor:
    update = y if bias is None else y + bias
    if training and dropout_p > 0.0:  # one mask, shared by the streams
        keys = dropout_keys
        update = pytorch_keyed_dropout(
            update, keys.token_keys, seed=keys.seed, site=keys.site, feature_offset=keys.feature_offset, p=dropout_p,
            words=keys.words,
        )
    compute = _compute_dtype(x, h_res, h_post, update)
    mixed = torch.einsum("tij,tjc->tic", h_res.to(compute), x.to(compute))  # [T, n, C]
    return (mixed + h_post.to(compute).unsqueeze(-1) * update.to(compute).unsqueeze(1)).to(x.dtype)


def pytorch_input_expand(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.unsqueeze(1).expand(-1, n, -1).contiguous()


def pytorch_output_contract(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=1)
