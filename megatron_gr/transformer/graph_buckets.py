"""Static shapes for CUDA graphs of jagged batches: a few token counts (buckets) a micro-batch
is padded to, as sequence parallelism pads (``TokenSplit``).

A captured graph replays fixed shapes and launch grids, while a jagged micro-batch holds
any number T of tokens in any number B of sequences, each up to ``max_seq_len`` long. So a
batch is padded to the smallest bucket ``S >= T`` with padding sequences of its own (at most
``max_seq_len`` tokens each, then empty ones), up to a fixed number of sequences
``capacity`` and the fixed longest length ``max_seq_len``::

    offsets [0, 3, 4, 9]   T = 9, B = 3;   bucket S = 16, capacity 8, max_seq_len 5
    ->      [0, 3, 4, 9, 14, 16, 16, 16, 16]      padding sequences of 5 and 2 tokens, then empty

Attention never crosses sequence boundaries, so no real token sees the padding and the
padding sees only itself; the model drops it before the loss. Buckets grow geometrically
(``RATIO``), so padding stays under about a quarter of the tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RATIO = 1.25
"""Each bucket is about this much larger than the one before."""
ALIGN = 128
"""Bucket sizes are multiples of this (and of the sequence-parallel group size)."""


@dataclass(frozen=True)
class TokenBuckets:
    """The static token counts of one run's micro-batches."""

    sizes: tuple[int, ...]
    """Bucket token counts, increasing; batches of more tokens than the last are not padded."""
    max_seq_len: int
    """The longest sequence of any batch: the static ``max_len`` of every padded batch."""
    max_sequences: int
    """Real sequences per micro-batch at most (the micro-batch size)."""

    @classmethod
    def build(cls, *, max_tokens: int, max_seq_len: int, max_sequences: int, multiple_of: int = 1) -> "TokenBuckets":
        """Buckets from ``ALIGN`` tokens up to the first at or above ``max_tokens``, each a
        multiple of ``ALIGN`` and ``multiple_of`` (the sequence-parallel size)."""
        if max_tokens < 1 or max_seq_len < 1 or max_sequences < 1 or multiple_of < 1:
            raise ValueError(
                f"token buckets need positive sizes, got max_tokens={max_tokens}, max_seq_len={max_seq_len}, "
                f"max_sequences={max_sequences}, multiple_of={multiple_of}"
            )
        step = ALIGN * multiple_of // math.gcd(ALIGN, multiple_of)
        sizes = [step]
        while sizes[-1] < max_tokens:
            sizes.append(max(sizes[-1] + step, _round_up(int(sizes[-1] * RATIO), step)))
        return cls(tuple(sizes), max_seq_len, max_sequences)

    def bucket(self, num_tokens: int) -> int | None:
        """The smallest bucket holding ``num_tokens`` tokens (None: larger than every bucket)."""
        for size in self.sizes:
            if size >= num_tokens:
                return size
        return None

    def capacity(self, bucket: int) -> int:
        """Sequences of a batch padded to ``bucket``: the real ones plus padding sequences of up
        to ``max_seq_len`` tokens (padding never exceeds the bucket)."""
        return self.max_sequences + -(-bucket // self.max_seq_len)


def padding_lengths(num_tokens: int, num_sequences: int, bucket: int, capacity: int, max_seq_len: int) -> list[int]:
    """Lengths of the sequences appended to a batch of ``num_tokens`` tokens in
    ``num_sequences`` sequences so that it holds ``bucket`` tokens in ``capacity``
    sequences: full padding sequences of ``max_seq_len``, the rest, then empty ones."""
    padding = bucket - num_tokens
    slots = capacity - num_sequences
    if padding < 0 or slots < 0 or padding > slots * max_seq_len:
        raise ValueError(
            f"cannot pad {num_tokens} tokens in {num_sequences} sequences to {bucket} tokens in {capacity} "
            f"sequences of at most {max_seq_len}"
        )
    full, rest = divmod(padding, max_seq_len)
    lengths = [max_seq_len] * full + ([rest] if rest else [])
    return lengths + [0] * (slots - len(lengths))


def padded_offsets(offsets: torch.Tensor, *, padding: int, slots: int, max_seq_len: int) -> torch.Tensor:
    """``offsets`` ``[B + 1]`` followed by the ends of ``slots`` padding sequences holding
    ``padding`` tokens as :func:`padding_lengths` lays them out: ``[B + 1 + slots]``. Built
    on the offsets' device (no host-to-device copy)."""
    if slots == 0:
        return offsets
    steps = torch.arange(1, slots + 1, device=offsets.device, dtype=offsets.dtype) * max_seq_len
    return torch.cat([offsets, offsets[-1:] + steps.clamp(max=padding)])


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step
