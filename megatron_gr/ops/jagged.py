"""Conversions between jagged (packed) and padded layouts.

A jagged tensor is ``values [T, ...]`` with ``offsets [B + 1]``: sequence b is
``values[offsets[b]:offsets[b + 1]]``. Padded means ``[B, N, ...]`` with N >= every length.
"""

from __future__ import annotations

from typing import Optional

import torch


def sequence_ids_and_positions(offsets: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each token: the sequence it belongs to and its position inside it. [T], [T]."""
    lengths = offsets[1:] - offsets[:-1]
    seq_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=num_tokens)
    positions = torch.arange(num_tokens, device=offsets.device) - offsets[seq_ids]
    return seq_ids, positions


def jagged_to_padded(
    values: torch.Tensor,
    offsets: torch.Tensor,
    max_len: int,
    pad_value: float = 0.0,
    *,
    index: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """[T, *rest] -> [B, max_len, *rest]; differentiable. ``index``: the offsets'
    :func:`sequence_ids_and_positions`, when the caller converts several tensors."""
    seq_ids, positions = index if index is not None else sequence_ids_and_positions(offsets, values.shape[0])
    padded = values.new_full((offsets.numel() - 1, max_len, *values.shape[1:]), pad_value)
    return padded.index_put((seq_ids, positions), values)


def padded_to_jagged(
    padded: torch.Tensor,
    offsets: torch.Tensor,
    num_tokens: int,
    *,
    index: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """[B, N, *rest] -> [T, *rest]; differentiable. ``index`` as in :func:`jagged_to_padded`."""
    seq_ids, positions = index if index is not None else sequence_ids_and_positions(offsets, num_tokens)
    return padded[seq_ids, positions]
