"""The tokens of a jagged micro-batch that one rank computes: all of them, or under context
parallelism its share (:mod:`~megatron_gr.transformer.context_parallel.split`).

Every rank of a context-parallel group receives the same micro-batch from the loader and
takes its share here, so loaders and data-parallel logic do not know about context
parallelism. A model reads its inputs through :meth:`BatchShard.take`, builds the STU
layers' metadata with :meth:`BatchShard.seq_params` (sequence-parallel padding included)
and finds the tokens that end a sequence with :meth:`BatchShard.last_tokens`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_gr.ops.key_layout import KeyLayout
from megatron_gr.transformer.context_parallel.attention import ContextAttention
from megatron_gr.transformer.context_parallel.split import ContextSplit, plan_context_split
from megatron_gr.transformer.jagged_seq_params import JaggedSeqParams
from megatron_gr.transformer.sequence_parallel import TokenSplit


class BatchShard:
    """This rank's tokens of one micro-batch; ``split`` None: every token."""

    def __init__(self, split: Optional[ContextSplit], group: Optional[dist.ProcessGroup], device: torch.device):
        self.split = split
        self.group = group
        self.device = device
        self.token_index = _device_tensors([split.token_index], device)[0] if split is not None else None

    @classmethod
    def of(
        cls,
        host_offsets: torch.Tensor,
        *,
        group: Optional[dist.ProcessGroup],
        split_threshold: int,
        device: torch.device,
        causal: bool = True,
        contextual_len: int = 0,
    ) -> "BatchShard":
        """The share of this rank of ``group`` (None or one rank: the whole batch) of a
        micro-batch with ``host_offsets`` (a CPU tensor)."""
        if group is None or group.size() == 1:
            return cls(None, None, device)
        lengths = np.diff(host_offsets.numpy())
        split = plan_context_split(
            lengths, size=group.size(), rank=group.rank(), split_threshold=split_threshold, causal=causal,
            contextual_len=contextual_len,
        )
        return cls(split, group, device)

    @classmethod
    def of_batch(cls, batch, *, group: Optional[dist.ProcessGroup], config) -> "BatchShard":
        """This rank's share of a jagged ``batch`` (``offsets``, ``offsets_on_host()``)
        under the model ``config``'s split threshold and contextual length; ``group`` None
        (no context parallelism): every token, without reading the offsets on the host."""
        if group is None:
            return cls(None, None, batch.offsets.device)
        return cls.of(
            batch.offsets_on_host(), group=group, device=batch.offsets.device,
            split_threshold=config.context_parallel_split_threshold, contextual_len=config.contextual_len,
        )

    def num_tokens(self, batch_tokens: int) -> int:
        return batch_tokens if self.split is None else self.split.num_tokens

    def take(self, values: torch.Tensor) -> torch.Tensor:
        """This rank's entries of a per-token tensor ``[T, ...]``."""
        return values if self.token_index is None else values[self.token_index]

    def last_tokens(self, offsets: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Local indices of the tokens that end a sequence here, and which sequences they end
        (None: all of them, in order)."""
        if self.split is None:
            return offsets[1:] - 1, None
        return tuple(_device_tensors([self.split.last_token, self.split.last_sequence], self.device))

    def seq_params(
        self,
        tokens: TokenSplit,
        offsets: torch.Tensor,
        max_len: int,
        *,
        timestamps: torch.Tensor,
        num_targets: Optional[torch.Tensor] = None,
        query_timestamps: Optional[torch.Tensor] = None,
        token_keys: Optional[torch.Tensor] = None,
        dropout_seed: int = 0,
    ) -> JaggedSeqParams:
        """The STU layers' metadata of the rank's tokens (plus ``tokens.padding``, one more
        sequence of its own); with context parallelism it carries the key exchange. The
        per-token inputs (``timestamps``, ``query_timestamps``, ``token_keys``) are the whole
        batch's: the rank takes its share (dropout keys name tokens, not ranks, so every
        context-parallel layout drops the same elements)."""
        if self.split is None:
            params = tokens.seq_params(
                offsets, max_len, timestamps=timestamps, query_timestamps=query_timestamps, token_keys=token_keys,
                dropout_seed=dropout_seed,
            )
            if num_targets is not None:
                params.num_targets = F.pad(num_targets, (0, 1 if tokens.padding else 0))
            return params
        split, pad = self.split, tokens.padding
        num_local = split.num_tokens + pad
        segment_length = np.append(split.segment_length, pad) if pad else split.segment_length
        key_length = np.append(split.key_length, pad) if pad else split.key_length
        remote_base = np.where(split.key_is_remote, num_local, 0)
        key_source = np.concatenate([split.key_source + remote_base, split.num_tokens + np.arange(pad)])
        second = np.concatenate([split.key_is_second, np.zeros(pad, dtype=bool)])
        (
            local_offsets, key_offsets, query_start, seq_lengths, key_source, first_slots, second_slots, send_index,
            key_token, segment_sequence,
        ) = _device_tensors(
            [
                _offsets(segment_length), _offsets(key_length), np.append(split.segment_start, 0)[: segment_length.size],
                np.append(split.sequence_length, pad)[: segment_length.size], key_source, np.flatnonzero(~second),
                np.flatnonzero(second), split.send_index, split.key_token, split.segment_sequence,
            ],
            self.device,
        )
        key_timestamps = F.pad(timestamps[key_token], (0, pad))
        local_timestamps = F.pad(self.take(timestamps), (0, pad))
        targets = None
        if num_targets is not None:
            targets = F.pad(num_targets[segment_sequence], (0, 1 if pad else 0))
        exchange = ContextAttention(
            group=self.group,
            key_layout=KeyLayout(
                key_offsets=key_offsets, query_start=query_start, seq_lengths=seq_lengths,
                max_key_len=int(key_length.max(initial=0)), key_timestamps=key_timestamps,
            ),
            key_source=key_source, first_slots=first_slots, second_slots=second_slots, send_index=send_index,
            send_len=split.send_len, num_local=num_local,
        )
        local_query_timestamps = None if query_timestamps is None else F.pad(self.take(query_timestamps), (0, pad))
        keys, local_keys = tokens.padded_keys(None if token_keys is None else self.take(token_keys))
        params = JaggedSeqParams.from_offsets(
            local_offsets, int(segment_length.max(initial=0)), timestamps=local_timestamps, num_targets=targets,
            query_timestamps=local_query_timestamps, dropout_seed=dropout_seed, token_keys=keys,
            local_token_keys=local_keys,
        )
        params.context_parallel = exchange
        return params


def _offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)])


def _device_tensors(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """int64 host arrays -> device tensors with one copy."""
    sizes = [int(a.size) for a in arrays]
    packed = torch.from_numpy(np.concatenate([np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays]))
    return list(packed.to(device, non_blocking=True).split(sizes))
