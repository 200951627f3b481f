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
from megatron_gr.ops.jagged import jagged_to_padded, padded_to_jagged, sequence_ids_and_positions
from megatron_gr.ops.key_layout import KeyLayout
from megatron_gr.ops.relative_bias import RelativeBiasInputs, dense_relative_bias, relative_bias_between


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
    mask_args = dict(
        causal=causal, max_attn_len=max_attn_len, contextual_len=contextual_len, global_prefix_len=global_prefix_len
    )
    if key_layout is not None:
        return _attention_between(
            q, k, v, offsets, key_layout, max_seq_len=max_seq_len, alpha=alpha, normalizer=normalizer,
            num_targets=num_targets, relative_bias=relative_bias, mask_args=mask_args,
        )
    num_tokens = q.shape[0]
    lengths = offsets[1:] - offsets[:-1]
    n = max_len if max_len is not None else (int(lengths.max()) if lengths.numel() else 0)
    compute = torch.promote_types(q.dtype, torch.float32)
    index = sequence_ids_and_positions(offsets, num_tokens)  # one for the four conversions
    qp = jagged_to_padded(q.to(compute), offsets, n, index=index)  # [B, N, H, Dqk]
    kp = jagged_to_padded(k.to(compute), offsets, n, index=index)  # [B, N, H, Dqk]
    vp = jagged_to_padded(v.to(compute), offsets, n, index=index)  # [B, N, H, Dv]
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
    return padded_to_jagged(out, offsets, num_tokens, index=index).to(v.dtype)


def _attention_between(
    q, k, v, offsets, keys: KeyLayout, *, max_seq_len, alpha, normalizer, num_targets, relative_bias, mask_args
) -> torch.Tensor:
    """Query segments against their own keys (see :class:`KeyLayout`), one segment at a
    time: context-parallel segments differ in size by orders of magnitude (a chunk of a long
    history beside whole short sequences), so padding them to one shape would waste most of
    the work."""
    compute = torch.promote_types(q.dtype, torch.float32)
    query_at, key_at = offsets.tolist(), keys.key_offsets.tolist()
    starts, lengths = keys.query_start.tolist(), keys.seq_lengths.tolist()
    targets = num_targets.tolist() if num_targets is not None else [0] * len(starts)
    outs = []
    for s, (start, length) in enumerate(zip(starts, lengths)):
        queries, keys_here = slice(query_at[s], query_at[s + 1]), slice(key_at[s], key_at[s + 1])
        qs, ks, vs = q[queries].to(compute), k[keys_here].to(compute), v[keys_here].to(compute)
        scores = torch.einsum("ihd,jhd->hij", qs, ks) * alpha  # [H, n, m]
        rows = start + torch.arange(qs.shape[0], device=q.device)  # positions in the sequence
        cols = torch.arange(ks.shape[0], device=q.device)
        if relative_bias is not None:
            bias = relative_bias_between(
                relative_bias, rows, relative_bias.timestamps[queries], keys.key_timestamps[keys_here], cache_key=s
            )
            scores = scores + bias.to(compute)
        mask = allowed_pairs(rows.view(-1, 1), cols.view(1, -1), torch.tensor(length, device=q.device),
                             num_targets=torch.tensor(targets[s], device=q.device), **mask_args)  # [n, m]
        scale = max_seq_len if normalizer == "max_seq_len" else max(length, 1)
        weights = F.silu(scores) * mask / scale
        outs.append(torch.einsum("hij,jhd->ihd", weights, vs))  # [n, H, Dv]
    out = torch.cat(outs) if outs else v.new_zeros(0, v.shape[1], v.shape[2], dtype=compute)
    return out.to(v.dtype)


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
