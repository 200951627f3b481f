"""Learned relative attention bias as attention-op inputs: the weights and the timestamps it
is computed from, never a dense ``[B, N, N]`` tensor (which does not fit at 8k-16k tokens).

For query i and key j of one sequence (positions inside the sequence, timestamps ts):

    bias_ij = position_weights[min(|i - j|, P - 1)] + time_weights[bucket(|tq_i - ts_j|)]

with P = ``len(position_weights)``, ``bucket`` from :func:`bucketize_time_gaps` over
``len(time_weights)`` buckets, and tq_i the query's time: its own timestamp ts_i, or given
``query_timestamps`` (the HSTU reference buckets ts_{i+1} - ts_j, the time of the event that
query i predicts minus the key's time). The bias is shared by all heads and computed in float32 (the
weights are upcast first). The reference materialises it per batch (:func:`dense_relative_bias`);
kernels compute it tile by tile and accumulate the weight gradients themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from megatron_gr.ops.bucket_lookup import bucket_lookup
from megatron_gr.ops.jagged import jagged_to_padded
from megatron_gr.ops.time_buckets import TIME_BUCKET_FNS, bucketize_time_gaps


@dataclass
class RelativeBiasInputs:
    position_weights: torch.Tensor
    """``[P]``: one weight per position distance bucket ``min(|i - j|, P - 1)``."""

    time_weights: torch.Tensor
    """``[NT]``: one weight per time-gap bucket."""

    timestamps: torch.Tensor
    """``[T]`` int64 event times (seconds) of the packed tokens."""

    time_bucket_fn: str = "sqrt"
    """``sqrt``, ``log`` or ``hstu_log``, see :func:`bucketize_time_gaps`."""

    query_timestamps: Optional[torch.Tensor] = None
    """``[T]`` int64 time of each token as a query; None: its own timestamp."""

    cache: Optional[dict[str, Any]] = field(default=None, repr=False)
    """Where the reference may keep the batch's bucket ids between layers (the batch's
    ``JaggedSeqParams.cache``); None recomputes them."""

    def validate(self, num_tokens: int) -> None:
        if self.position_weights.dim() != 1 or self.time_weights.dim() != 1:
            raise ValueError(
                "relative bias weights must be 1-D, got position "
                f"{tuple(self.position_weights.shape)} and time {tuple(self.time_weights.shape)}"
            )
        if self.position_weights.numel() < 1 or self.time_weights.numel() < 1:
            raise ValueError("relative bias needs at least one position and one time bucket")
        if self.timestamps.shape != (num_tokens,) or self.timestamps.dtype != torch.int64:
            raise ValueError(
                f"relative bias timestamps must be int64 [T={num_tokens}], got "
                f"{self.timestamps.dtype} {tuple(self.timestamps.shape)}"
            )
        query = self.query_timestamps
        if query is not None and (query.shape != (num_tokens,) or query.dtype != torch.int64):
            raise ValueError(
                f"relative bias query_timestamps must be int64 [T={num_tokens}], got {query.dtype} {tuple(query.shape)}"
            )
        if self.time_bucket_fn not in TIME_BUCKET_FNS:
            raise ValueError(f"time_bucket_fn={self.time_bucket_fn!r}: choose one of {TIME_BUCKET_FNS}")


def relative_bias_buckets(
    bias: RelativeBiasInputs, offsets: torch.Tensor, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position buckets ``[N, N]`` and time buckets ``[B, N, N]`` (N = ``max_len``)."""
    key = (
        "relative_bias_buckets", max_len, bias.position_weights.numel(), bias.time_weights.numel(),
        bias.time_bucket_fn, bias.query_timestamps is not None,
    )
    if bias.cache is not None and key in bias.cache:
        return bias.cache[key]
    idx = torch.arange(max_len, device=offsets.device)
    distance = (idx.view(-1, 1) - idx.view(1, -1)).abs()
    position = distance.clamp(max=bias.position_weights.numel() - 1)
    ts = jagged_to_padded(bias.timestamps, offsets, max_len)  # [B, N]
    query = ts if bias.query_timestamps is None else jagged_to_padded(bias.query_timestamps, offsets, max_len)
    time = bucketize_time_gaps(query.unsqueeze(2) - ts.unsqueeze(1), bias.time_weights.numel(), bias.time_bucket_fn)
    if bias.cache is not None:
        bias.cache[key] = (position, time)
    return position, time


def dense_relative_bias(bias: RelativeBiasInputs, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    """The float32 (float64 for float64 weights) bias ``[B, N, N]``, differentiable in both
    weight vectors."""
    position, time = relative_bias_buckets(bias, offsets, max_len)
    compute = torch.promote_types(bias.position_weights.dtype, torch.float32)
    # Millions of ids hit a few hundred weights: bucket_lookup's histogram backward avoids
    # the sort that plain indexing's backward needs.
    return bucket_lookup(bias.position_weights.to(compute), position).unsqueeze(0) + bucket_lookup(
        bias.time_weights.to(compute), time
    )


def relative_bias_between(
    bias: RelativeBiasInputs,
    rows: torch.Tensor,
    query_timestamps: torch.Tensor,
    key_timestamps: torch.Tensor,
    *,
    cache_key: Any = None,
) -> torch.Tensor:
    """The bias ``[n, m]`` of ``n`` queries at sequence positions ``rows`` against the keys
    at positions ``0..m-1``, from their timestamps (``[n]``, ``[m]``); float32 (float64 for
    float64 weights), differentiable in both weight vectors. ``cache_key`` names the bucket
    ids in ``bias.cache``, where every layer finds them."""
    key = ("relative_bias_between", cache_key, bias.position_weights.numel(), bias.time_weights.numel(), bias.time_bucket_fn)
    cached = bias.cache is not None and cache_key is not None
    if cached and key in bias.cache:
        position, time = bias.cache[key]
    else:
        cols = torch.arange(key_timestamps.numel(), device=rows.device, dtype=rows.dtype)
        position = (rows.view(-1, 1) - cols.view(1, -1)).abs().clamp(max=bias.position_weights.numel() - 1)
        gaps = query_timestamps.view(-1, 1) - key_timestamps.view(1, -1)
        time = bucketize_time_gaps(gaps, bias.time_weights.numel(), bias.time_bucket_fn)
        if cached:
            bias.cache[key] = (position, time)
    compute = torch.promote_types(bias.position_weights.dtype, torch.float32)
    return bucket_lookup(bias.position_weights.to(compute), position) + bucket_lookup(bias.time_weights.to(compute), time)
