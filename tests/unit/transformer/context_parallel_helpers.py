"""Attention split over simulated context-parallel ranks in one process: each rank's queries
against its segments' keys taken straight from the full batch (what the all-gather
delivers), the outputs added back into the batch. Used by the reference and kernel tests."""

from __future__ import annotations

import itertools
from typing import Optional

import torch

from megatron_gr.ops.hstu_attention import hstu_attention
from megatron_gr.ops.key_layout import KeyLayout
from megatron_gr.ops.relative_bias import RelativeBiasInputs
from megatron_gr.transformer.context_parallel import ContextSplit, plan_context_split

MASKS = {
    "causal": dict(),
    "bidirectional": dict(causal=False),
    "window": dict(max_attn_len=5),
    "contextual": dict(contextual_len=3),
    "targets": dict(targets=True),
    "sla": dict(max_attn_len=4, global_prefix_len=6),
    "all": dict(max_attn_len=4, global_prefix_len=6, contextual_len=2, targets=True),
    "bidirectional_all": dict(causal=False, max_attn_len=4, global_prefix_len=6, contextual_len=2, targets=True),
}


def offsets_of(lengths) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(int(n) for n in lengths)], dtype=torch.int64)


def key_layout_of(plan: ContextSplit, timestamps: Optional[torch.Tensor]) -> KeyLayout:
    key_token = torch.from_numpy(plan.key_token)
    return KeyLayout(
        key_offsets=offsets_of(plan.key_length),
        query_start=torch.from_numpy(plan.segment_start),
        seq_lengths=torch.from_numpy(plan.sequence_length),
        max_key_len=int(plan.key_length.max(initial=0)),
        key_timestamps=timestamps[key_token] if timestamps is not None else None,
    )


def split_attention(q, k, v, lengths, *, size: int, threshold: int, num_targets=None, relative_bias=None,
                    causal=True, contextual_len=0, kernel="pytorch", **kwargs) -> torch.Tensor:
    """``hstu_attention`` of the whole batch computed rank by rank (differentiable)."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=v.dtype, device=v.device)
    for rank in range(size):
        plan = plan_context_split(
            lengths, size=size, rank=rank, split_threshold=threshold, causal=causal, contextual_len=contextual_len
        )
        tokens = torch.from_numpy(plan.token_index).to(q.device)
        keys = torch.from_numpy(plan.key_token).to(q.device)
        bias = None
        if relative_bias is not None:
            bias = RelativeBiasInputs(
                relative_bias.position_weights, relative_bias.time_weights, relative_bias.timestamps[tokens],
                relative_bias.time_bucket_fn,
            )
        layout = key_layout_of(plan, relative_bias.timestamps if relative_bias is not None else None)
        layout = KeyLayout(**{name: getattr(layout, name).to(q.device) if isinstance(getattr(layout, name), torch.Tensor)
                              else getattr(layout, name) for name in layout.__dataclass_fields__})
        targets = num_targets[torch.from_numpy(plan.segment_sequence).to(q.device)] if num_targets is not None else None
        local = hstu_attention(
            q[tokens], k[keys], v[keys], offsets_of(plan.segment_length).to(q.device), key_layout=layout,
            num_targets=targets, relative_bias=bias, causal=causal, contextual_len=contextual_len,
            max_len=int(plan.segment_length.max(initial=0)), kernel=kernel, **kwargs,
        )
        out = out.index_add(0, tokens, local)
    return out
