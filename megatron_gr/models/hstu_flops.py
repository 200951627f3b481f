"""Useful floating-point operations of an HSTU retrieval training step (forward + backward),
for TFLOP/s and MFU reports.

Counted, per token or per attention pair the mask keeps (padding and masked pairs are not
useful work and never counted), 2 FLOPs per multiply-add:

- projections: the fused UVQK projection ``C -> H (2 dv + 2 dqk)`` and the output
  projection ``H dv -> C`` of every layer;
- attention: ``q k^T`` and ``P v`` over the pairs the causal mask keeps (window, global
  prefix and contextual tokens included: :func:`attention_pairs`);
- relative bias (when on): its two adds per pair and head (position and time weight);
- hyper-connections (when on), per STU sublayer: the mappings' projection
  ``[n C] -> [n^2 + 2n]``, the aggregate over n streams and the merge
  (``h_res @ streams`` and ``h_post`` times the output);
- the loss: the positive and the shared negatives' scores ``[T, C] x [C, R + 1]``.

Backward = 2 x forward (the usual MFU convention). Not counted: norms, SiLU, dropout,
embeddings, Sinkhorn, the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable

import numpy as np
import torch

from megatron_gr.config.transformer_config import GRTransformerConfig


@dataclass(frozen=True)
class StepFlops:
    """Forward + backward FLOPs of one step, by part."""

    projections: int = 0
    attention: int = 0
    relative_bias: int = 0
    hyper_connections: int = 0
    loss: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def __add__(self, other: "StepFlops") -> "StepFlops":
        return StepFlops(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, int]:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "total": self.total}


def attention_pairs(lengths, *, max_attn_len: int = 0, global_prefix_len: int = 0, contextual_len: int = 0) -> int:
    """Pairs the causal mask of :mod:`megatron_gr.ops.attention_mask` keeps (no target
    tokens): query i sees keys ``j <= i`` with ``i - j <= w`` or ``j < g`` when a window
    ``w > 0`` is set (all ``j <= i`` otherwise), and every contextual key ``j < c``."""
    lengths = np.asarray(torch.as_tensor(lengths).cpu(), dtype=np.int64)
    if max_attn_len == 0 and contextual_len == 0:
        return int((lengths * (lengths + 1) // 2).sum())
    values, counts = np.unique(lengths, return_counts=True)
    total = 0
    for length, count in zip(values.tolist(), counts.tolist()):
        total += count * _pairs_of_one_length(length, max_attn_len, global_prefix_len, contextual_len)
    return total


def _pairs_of_one_length(length: int, w: int, g: int, c: int) -> int:
    i = np.arange(length, dtype=np.int64)
    if w > 0:
        start = np.maximum(i - w, 0)  # the window [start, i]
        prefix = np.minimum(g, start)  # prefix keys [0, prefix) left of the window
        seen = (i - start + 1) + prefix
    else:
        start = np.zeros_like(i)
        prefix = np.zeros_like(i)
        seen = i + 1
    contextual = min(c, length)
    if contextual:
        # Contextual keys [0, c) that the causal rules above did not already count.
        below = np.minimum(contextual, i + 1)  # contextual keys j <= i
        counted = np.minimum(contextual, prefix) + np.maximum(0, below - start)
        seen = seen + contextual - counted
    return int(seen.sum())


def batch_flops(config: GRTransformerConfig, lengths) -> StepFlops:
    """Forward + backward FLOPs of one micro-batch of sequences of ``lengths`` tokens."""
    lengths = torch.as_tensor(lengths).to(torch.int64)
    tokens = int(lengths.sum())
    c, h = config.hidden_size, config.num_attention_heads
    dqk, dv = config.qk_head_dim, config.v_head_dim
    window, prefix = config.attention_window
    pairs = attention_pairs(
        lengths, max_attn_len=window, global_prefix_len=prefix, contextual_len=config.contextual_len
    )
    layers = config.num_layers
    forward = StepFlops(
        projections=layers * (2 * tokens * c * h * (2 * dv + 2 * dqk) + 2 * tokens * h * dv * c),
        attention=layers * 2 * pairs * h * (dqk + dv),
        relative_bias=layers * 2 * pairs * h if config.relative_attention_bias else 0,
        hyper_connections=layers * _mhc_sublayer_flops(config, tokens) if config.enable_hyper_connections else 0,
        loss=2 * tokens * c * (config.num_negatives + config.num_in_batch_negatives + 1),
    )
    return StepFlops(**{name: 3 * value for name, value in forward.as_dict().items() if name != "total"})


def _mhc_sublayer_flops(config: GRTransformerConfig, tokens: int) -> int:
    n, c = config.num_residual_streams, config.hidden_size
    mappings = 2 * tokens * n * c * (n * n + 2 * n)
    aggregate = 2 * tokens * n * c
    merge = 2 * tokens * n * n * c + 2 * tokens * n * c
    return mappings + aggregate + merge


def step_flops(config: GRTransformerConfig, micro_batch_lengths: Iterable) -> StepFlops:
    """FLOPs of one optimizer step from the lengths of each of its micro-batches (the
    negatives are shared within a micro-batch, so the loss counts per micro-batch)."""
    total = StepFlops()
    for lengths in micro_batch_lengths:
        total = total + batch_flops(config, lengths)
    return total


def training_step_flops(config: GRTransformerConfig, lengths: torch.Tensor) -> int:
    """Total FLOPs of sequences of ``lengths`` tokens taken as one micro-batch (for callers
    that only have the concatenated lengths; :func:`step_flops` counts the loss per
    micro-batch)."""
    return batch_flops(config, lengths).total
