"""Sequence parallelism for jagged batches: the packed tokens ``[T, 1, C]`` are split into
``tp`` equal slices ``[T / tp, 1, C]`` between the attention blocks.

T rarely divides by ``tp``, so the batch is padded with ``p < tp`` tokens that form a
sequence of their own at the end (offsets get one more entry)::

    offsets [0, 3, 4, 7]  tp = 2  ->  offsets [0, 3, 4, 7, 8]   one padding token

Attention never crosses sequence boundaries, so no real token sees the padding and the
padding sees only itself; the model drops the padding before the loss and the ranks. A
context-parallel rank left without tokens by a micro-batch (one short sequence, placed
whole on another rank) is padded the same way, so that no layer sees an empty batch. CUDA
graphs pad the same way, to a few static token counts (``graph_buckets``).

The tokens' dropout keys follow them: the padded batch's keys (padding tokens get negative
keys, which no real token has) and this rank's slice of them (``JaggedSeqParams``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel

from megatron_gr.transformer.graph_buckets import TokenBuckets, padded_offsets
from megatron_gr.transformer.jagged_seq_params import JaggedSeqParams


@dataclass(frozen=True)
class TokenSplit:
    """How a batch's tokens are laid out between the attention blocks."""

    num_tokens: int  # real tokens T
    # tokens appended so that T + padding divides by the group size (and is not 0), or fills a bucket
    padding: int
    group: Optional[torch.distributed.ProcessGroup]  # None: tokens are not split
    # sequences appended for the padding, empty ones included (None: one if there is padding)
    bucket_sequences: Optional[int] = None
    static_max_len: Optional[int] = None  # with buckets: the longest length of every padded batch

    @property
    def padding_sequences(self) -> int:
        if self.bucket_sequences is not None:
            return self.bucket_sequences
        return 1 if self.padding else 0

    @classmethod
    def for_tokens(
        cls,
        num_tokens: int,
        group: Optional[torch.distributed.ProcessGroup],
        *,
        never_empty: bool = False,
        num_sequences: int = 0,
        buckets: Optional[TokenBuckets] = None,
    ) -> "TokenSplit":
        """The layout of ``num_tokens`` tokens in ``num_sequences`` sequences.
        ``never_empty``: pad a batch without tokens (a context-parallel rank's share). With
        ``buckets`` (CUDA graphs: ``graph_buckets``) a batch is padded to its bucket and to the
        bucket's fixed number of sequences, when one holds it."""
        size = group.size() if group is not None else 1
        split = group if size > 1 else None
        bucket = buckets.bucket(num_tokens) if buckets is not None else None
        if bucket is not None:
            slots = buckets.capacity(bucket) - num_sequences
            return cls(num_tokens, bucket - num_tokens, split, slots, buckets.max_seq_len)
        padding = -num_tokens % size
        if never_empty and num_tokens + padding == 0:
            padding = size
        return cls(num_tokens, padding, split)

    def seq_params(
        self,
        offsets: torch.Tensor,
        max_len: int,
        timestamps: Optional[torch.Tensor] = None,
        query_timestamps: Optional[torch.Tensor] = None,
        *,
        num_targets: Optional[torch.Tensor] = None,
        token_keys: Optional[torch.Tensor] = None,
        dropout_seed: int = 0,
    ) -> JaggedSeqParams:
        """Jagged metadata of the padded batch: the padding is one more sequence (sequences
        of up to the bucket's ``max_seq_len``, then empty ones, with buckets), with no
        targets (``num_targets`` ``[B]`` -> ``[B + padding sequences]``). ``token_keys``
        ``[T]`` (the batch's dropout keys) are padded and sliced too."""
        if self.padding_sequences:
            longest = self.static_max_len or self.padding
            offsets = padded_offsets(offsets, padding=self.padding, slots=self.padding_sequences, max_seq_len=longest)
        if self.static_max_len is not None:
            max_len = self.static_max_len
        elif self.padding:
            max_len = max(max_len, self.padding)
        if self.padding:
            if timestamps is not None:
                timestamps = F.pad(timestamps, (0, self.padding))
            if query_timestamps is not None:
                query_timestamps = F.pad(query_timestamps, (0, self.padding))
        if num_targets is not None and self.padding_sequences:
            num_targets = F.pad(num_targets, (0, self.padding_sequences))
        token_keys, local_keys = self.padded_keys(token_keys)
        return JaggedSeqParams.from_offsets(
            offsets, max_len, timestamps=timestamps, query_timestamps=query_timestamps, num_targets=num_targets,
            dropout_seed=dropout_seed, token_keys=token_keys, local_token_keys=local_keys,
        )

    def padded_keys(self, token_keys: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The tokens' dropout keys with the padding's (negative: no real token has one), and
        this rank's slice of them (the tokens ``scatter`` keeps)."""
        if token_keys is None:
            return None, None
        if self.padding:
            padding_keys = -1 - torch.arange(self.padding, dtype=token_keys.dtype, device=token_keys.device)
            token_keys = torch.cat([token_keys, padding_keys])
        if self.group is None:
            return token_keys, token_keys
        return token_keys, token_keys.view(self.group.size(), -1)[self.group.rank()]

    def scatter(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[T, 1, C]`` (the same on every rank) -> this rank's ``[(T + p) / tp, 1, C]``."""
        if self.padding:
            hidden = F.pad(hidden, (0, 0, 0, 0, 0, self.padding))
        if self.group is None:
            return hidden
        return tensor_parallel.scatter_to_sequence_parallel_region(hidden, group=self.group)

    def gather(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's ``[(T + p) / tp, 1, C]`` -> ``[T, 1, C]`` on every rank.

        Every rank then computes the same loss from the same tokens, so the backward pass
        keeps only this rank's slice of the gradient (no reduction).
        """
        if self.group is not None:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False, group=self.group
            )
        return hidden[: self.num_tokens] if self.padding else hidden
