"""Micro-batches of ULTRA-HSTU: one :class:`RankingBatch` per channel for the same samples
(each channel's sequences hold its own history; contextual tokens, candidates, labels and
users are the same in every channel).

The training stream is the ranking stream (same epochs, same partition into
micro-batches and data-parallel blocks) with the attention cost of a sample summed over
its channels; with one channel it yields the batches of ``RankingTrainingBatches``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np

from megatron_gr.data.loader import step_dropout_seed
from megatron_gr.data.ranking.batch import RankingBatch
from megatron_gr.data.ranking.indexed import IndexedSamples
from megatron_gr.data.ranking.loader import RankingTrainingBatches, SequenceLayout, make_batch
from megatron_gr.data.ranking.samples import SPLITS


@dataclass
class ChannelBatch:
    channels: dict[str, RankingBatch]
    """Channel name -> its batch, in the model's channel order."""
    max_candidates: int = 0
    """Most candidates of one sample (a host int: bounds truncated lengths without a sync)."""
    pipeline_shapes: Optional[list[tuple[tuple[int, int, int], tuple[int, int, int]]]] = None
    """Per pipeline stage, (received, sent) activation shapes (``training.steps``); None:
    megatron's default."""
    kept_tokens: Optional[dict[str, int]] = None
    """Channel name -> its tokens after attention truncation, for the channels that truncate
    (host ints counted by the loader, so the model re-packs without reading the device);
    None: not counted (the model counts on the device)."""

    @property
    def first(self) -> RankingBatch:
        return next(iter(self.channels.values()))

    @property
    def num_tokens(self) -> int:
        """Tokens of every channel (before truncation)."""
        return sum(batch.num_tokens for batch in self.channels.values())

    @property
    def num_candidates(self) -> int:
        return self.first.num_candidates

    def to(self, device) -> "ChannelBatch":
        return ChannelBatch({name: batch.to(device) for name, batch in self.channels.items()}, self.max_candidates,
                            self.pipeline_shapes, self.kept_tokens)


@dataclass
class Channel:
    data: IndexedSamples
    layout: SequenceLayout


def make_channel_batch(
    channels: dict[str, Channel], chunk: np.ndarray, *, key_base: Optional[np.ndarray] = None, dropout_seed: int = 0
) -> ChannelBatch:
    """The batches of samples ``chunk`` in every channel. ``key_base``: each sample's index
    in the global batch (training; None: no dropout keys). Channel c of n keys its tokens
    from ``(index x n + c) x max_seq_len``: no two tokens of a step share a key, and one
    channel keys them as DLRM-HSTU does."""
    batches = {}
    for c, (name, channel) in enumerate(channels.items()):
        keys = None if key_base is None else (key_base * len(channels) + c) * channel.layout.max_seq_len
        batches[name] = make_batch(channel.data, channel.layout, chunk, key_base=keys, dropout_seed=dropout_seed)
    first = next(iter(channels.values())).data.samples
    counts = first.num_candidates[chunk]
    return ChannelBatch(batches, max_candidates=int(counts.max()) if counts.size else 0)


class ChannelTrainingBatches(RankingTrainingBatches):
    """The ranking training stream over several channels of the same samples."""

    def __init__(self, channels: dict[str, Channel], *, finish: Callable[[ChannelBatch], ChannelBatch] = None, **kwargs):
        """``finish``: applied to every batch (the model's spec fills in facts it needs)."""
        first = next(iter(channels.values()))
        super().__init__(first.data, first.layout, **kwargs)
        self.channels = channels
        self.finish = finish or (lambda batch: batch)
        self.lengths = sum(channel.layout.lengths for channel in channels.values())

    def next_step(self) -> list[ChannelBatch]:
        first, chosen = self._next_global_samples()
        dropout_seed = step_dropout_seed(self.seed, first)
        return [
            self.finish(make_channel_batch(self.channels, chosen[part], key_base=part.astype(np.int64),
                                           dropout_seed=dropout_seed))
            for part in self._my_parts(self.lengths[chosen])
        ]


def channel_evaluation_batches(
    channels: dict[str, Channel], which: str, *, batch_size: int, dp_rank: int = 0, dp_size: int = 1
) -> Iterator[ChannelBatch]:
    """Every sample of ``which`` once, as ``ranking_evaluation_batches`` splits them."""
    first = next(iter(channels.values())).data.samples
    chosen = np.flatnonzero(first.split == SPLITS[which])
    mine = np.array_split(chosen, dp_size)[dp_rank]
    for start in range(0, mine.size, batch_size):
        yield make_channel_batch(channels, mine[start : start + batch_size])
