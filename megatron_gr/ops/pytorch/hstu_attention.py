"""Reference jagged HSTU attention: pad, score every pair, mask, unpad.

    out_i = sum_j mask(i, j) * SiLU(alpha * q_i . k_j + bias_ij) / n * v_j

with n the normaliser (``max_seq_len``, or the sequence's own length). Computed in float32
for half-precision inputs (float64 stays float64, for gradient checks); readable, not fast.
With a :class:`~megatron_gr.ops.key_layout.KeyLayout` the queries are segments of their
sequences and the keys are packed separately; i and j are then positions in the sequence.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_gr.ops.attention_mask import allowed_pairs, attention_mask
from megatron_gr.ops.jagged import jagged_to_padded, padded_to_jagged
from megatron_gr.ops.key_layout import KeyLayout
from megatron_gr.ops.relative_bias import RelativeBiasInputs, dense_relative_bias, dense_relative_bias_between


def pytorch_hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    *,
    max_seq_len: int,
    alpha: float,
    normalizer: str = "max_seq_len",
    causal: bool = True,
    max_attn_len: int = 0,
    contextual_len: int = 0,
    num_targets: Optional[torch.Tensor] = None,
    global_prefix_len: int = 0,
    relative_bias: Optional[RelativeBiasInputs] = None,
    max_len: Optional[int] = None,
    key_layout: Optional[KeyLayout] = None,
) -> torch.Tensor:
    num_tokens = q.shape[0]
    lengths = offsets[1:] - offsets[:-1]
    n = max_len if max_len is not None else (int(lengths.max()) if lengths.numel() else 0)
    mask_args = dict(
        causal=causal, max_attn_len=max_attn_len, contextual_len=contextual_len, global_prefix_len=global_prefix_len
    )
    if key_layout is not None:
        return _attention_between(
            q, k, v, offsets, n, key_layout, max_seq_len=max_seq_len, alpha=alpha, normalizer=normalizer,
            num_targets=num_targets, relative_bias=relative_bias, mask_args=mask_args,
        )
    compute = torch.promote_types(q.dtype, torch.float32)
    qp = jagged_to_padded(q.to(compute), offsets, n)  # [B, N, H, Dqk]
    kp = jagged_to_padded(k.to(compute), offsets, n)  # [B, N, H, Dqk]
    vp = jagged_to_padded(v.to(compute), offsets, n)  # [B, N, H, Dv]
    scores = torch.einsum("bihd,bjhd->bhij", qp, kp) * alpha  # [B, H, N, N]
    if relative_bias is not None:
        scores = scores + dense_relative_bias(relative_bias, offsets, n)[:, None].to(compute)
    mask = attention_mask(lengths, n, num_targets=num_targets, **mask_args)
    weights = F.silu(scores) * mask[:, None]
    if normalizer == "max_seq_len":
        weights = weights / max_seq_len
    else:
        weights = weights / lengths.clamp(min=1).view(-1, 1, 1, 1).to(weights.dtype)
    out = torch.einsum("bhij,bjhd->bihd", weights, vp)  # [B, N, H, Dv]
    return padded_to_jagged(out, offsets, num_tokens).to(v.dtype)


def _attention_between(
    q, k, v, offsets, max_len, keys: KeyLayout, *, max_seq_len, alpha, normalizer, num_targets, relative_bias, mask_args
) -> torch.Tensor:
    """Query segments against their own keys (see :class:`KeyLayout`), pair by pair."""
    num_keys = keys.max_key_len
    compute = torch.promote_types(q.dtype, torch.float32)
    qp = jagged_to_padded(q.to(compute), offsets, max_len)  # [S, NQ, H, Dqk]
    kp = jagged_to_padded(k.to(compute), keys.key_offsets, num_keys)  # [S, NK, H, Dqk]
    vp = jagged_to_padded(v.to(compute), keys.key_offsets, num_keys)  # [S, NK, H, Dv]
    scores = torch.einsum("sihd,sjhd->shij", qp, kp) * alpha  # [S, H, NQ, NK]
    if relative_bias is not None:
        scores = scores + dense_relative_bias_between(relative_bias, offsets, max_len, keys)[:, None].to(compute)
    device = offsets.device
    query_len = (offsets[1:] - offsets[:-1]).view(-1, 1, 1)
    key_len = (keys.key_offsets[1:] - keys.key_offsets[:-1]).view(-1, 1, 1)
    rows = torch.arange(max_len, device=device).view(1, -1, 1)  # [1, NQ, 1] within the segment
    cols = torch.arange(num_keys, device=device).view(1, 1, -1)  # [1, 1, NK] = key positions
    mask = allowed_pairs(
        keys.query_start.view(-1, 1, 1) + rows, cols, keys.seq_lengths.view(-1, 1, 1),
        num_targets=num_targets.view(-1, 1, 1) if num_targets is not None else None, **mask_args,
    )
    mask = mask & (rows < query_len) & (cols < key_len)  # [S, NQ, NK]
    weights = F.silu(scores) * mask[:, None]
    if normalizer == "max_seq_len":
        weights = weights / max_seq_len
    else:
        weights = weights / keys.seq_lengths.clamp(min=1).view(-1, 1, 1, 1).to(weights.dtype)
    out = torch.einsum("shij,sjhd->sihd", weights, vp)  # [S, NQ, H, Dv]
    return padded_to_jagged(out, offsets, q.shape[0]).to(v.dtype)


def pytorch_hstu_attention_backward(grad_out: torch.Tensor, q, k, v, offsets, **kwargs) -> tuple:
    """``(dq, dk, dv, d_position_weights, d_time_weights)`` of :func:`pytorch_hstu_attention`
    for the output gradient ``grad_out`` (the bias gradients are None without a bias): the
    forward recomputed under autograd, for callers that keep only the inputs."""
    bias: Optional[RelativeBiasInputs] = kwargs.get("relative_bias")
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        if bias is not None:
            weights = [bias.position_weights.detach().requires_grad_(), bias.time_weights.detach().requires_grad_()]
            kwargs = dict(kwargs, relative_bias=replace(bias, position_weights=weights[0], time_weights=weights[1]))
            leaves += weights
        out = pytorch_hstu_attention(*leaves[:3], offsets, **kwargs)
        grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]
    return (*grads[:3], *(grads[3:] if bias is not None else (None, None)))
