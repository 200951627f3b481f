"""Useful floating-point operations of an HSTU retrieval training step (forward + backward),
for TFLOP/s and MFU reports. Counts only unmasked attention pairs; no padding, no
elementwise work."""

from __future__ import annotations

import torch

from megatron_gr.config.transformer_config import GRTransformerConfig


def causal_pairs(lengths: torch.Tensor) -> int:
    """Query-key pairs a causal mask keeps: sum of L(L+1)/2."""
    lengths = lengths.to(torch.int64)
    return int((lengths * (lengths + 1) // 2).sum())


def training_step_flops(config: GRTransformerConfig, lengths: torch.Tensor) -> int:
    """Matmul FLOPs of forward + backward (backward = 2 x forward) for sequences of
    ``lengths`` tokens, causal attention, sampled softmax over the shared negatives."""
    tokens = int(lengths.sum())
    c, h = config.hidden_size, config.num_attention_heads
    dqk, dv = config.qk_head_dim, config.v_head_dim
    projections = 2 * tokens * c * h * (2 * dv + 2 * dqk) + 2 * tokens * h * dv * c
    attention = 2 * causal_pairs(lengths) * h * (dqk + dv)
    negatives = config.num_negatives + config.num_in_batch_negatives
    loss = 2 * tokens * c * (negatives + 1)
    forward = config.num_layers * (projections + attention) + loss
    return 3 * forward
