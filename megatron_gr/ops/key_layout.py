"""Queries and keys in different jagged layouts: what attention needs when a rank holds only
part of a sequence's queries but sees all of the keys they attend to (context parallelism).

Query segment s holds the queries at positions ``[query_start[s], query_start[s] + n_s)`` of a
sequence of ``seq_lengths[s]`` tokens (``n_s`` from the query offsets); its keys are that
sequence's tokens at positions ``[0, m_s)``, packed as the s-th segment of the keys (``m_s``
from ``key_offsets``). Every mask rule and the relative bias use these positions, so a chunk
of a sequence attends exactly as it would inside the whole sequence. For a sequence of 12
tokens cut into 4 chunks of 3, the rank holding chunks 0 and 3 (causal: each chunk needs the
keys up to its end)::

    query offsets  [0, 3, 6]       queries: positions 0-2, then 9-11
    query_start    [0, 9]
    key_offsets    [0, 3, 15]      keys: positions 0-2, then 0-11
    seq_lengths    [12, 12]

Keys must cover the queries (``query_start + n_s <= m_s <= seq_lengths``). A whole sequence
is the segment with ``query_start = 0`` and ``m_s = n_s = seq_lengths``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class KeyLayout:
    key_offsets: torch.Tensor
    """``[S + 1]`` int64 boundaries of each query segment's keys in the packed keys."""

    query_start: torch.Tensor
    """``[S]`` int64 position of each segment's first query in its sequence."""

    seq_lengths: torch.Tensor
    """``[S]`` int64 length of the whole sequence (targets sit at its end; the ``seq_len``
    normaliser divides by it)."""

    max_key_len: int
    """The longest key segment (a host int: kernels size their grids with it)."""

    key_timestamps: Optional[torch.Tensor] = None
    """``[Tk]`` int64 event times of the keys, for the relative time bias (the queries' are in
    :class:`~megatron_gr.ops.relative_bias.RelativeBiasInputs`)."""

    def validate(self, num_segments: int, num_keys: int, *, needs_timestamps: bool) -> None:
        if self.key_offsets.shape != (num_segments + 1,):
            raise ValueError(
                f"key_offsets must have one entry more than the query segments ({num_segments + 1}), "
                f"got {tuple(self.key_offsets.shape)}"
            )
        for name in ("query_start", "seq_lengths"):
            value = getattr(self, name)
            if value.shape != (num_segments,):
                raise ValueError(f"{name} must be [S={num_segments}] (one per query segment), got {tuple(value.shape)}")
        if needs_timestamps and (
            self.key_timestamps is None
            or self.key_timestamps.shape != (num_keys,)
            or self.key_timestamps.dtype != torch.int64
        ):
            got = None if self.key_timestamps is None else (self.key_timestamps.dtype, tuple(self.key_timestamps.shape))
            raise ValueError(f"the relative bias needs int64 key_timestamps [Tk={num_keys}], got {got}")
