"""Ranking micro-batches: a deterministic training stream of samples and the evaluation
batches of a split, each a :class:`RankingBatch`.

As the retrieval loader: epoch e of the training stream is a permutation drawn from
``derive_seed(seed, "data", e)``; each optimizer step takes one global batch of samples,
partitions it into micro-batches by ``partition_fn`` (which sees each sample's token count)
and data-parallel rank r takes the r-th block, so every layout trains on the same
micro-batches. Training batches carry the dropout keys of their tokens (the sample's index
in the global batch x ``max_seq_len`` + position) and the step's dropout seed, so every
layout drops the same elements.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

from megatron_gr.data.loader import PartitionFn, StepStream, contiguous_partition, step_dropout_seed
from megatron_gr.data.ranking.batch import RankingBatch
from megatron_gr.data.ranking.indexed import IndexedSamples
from megatron_gr.data.ranking.samples import SPLITS, TRAIN


class SequenceLayout:
    """How many history events each sample keeps: the latest ones that fit ``max_seq_len``
    beside its contextual tokens and candidates (none with ``use_history=False``)."""

    def __init__(self, data: IndexedSamples, *, max_seq_len: int, use_history: bool):
        samples = data.samples
        room = max_seq_len - data.num_contextual - samples.num_candidates
        if (room < 0).any() or (use_history and (room < 1).any()):
            worst = int(samples.num_candidates.max())
            raise ValueError(
                f"a sample has {worst} candidates: with {data.num_contextual} contextual tokens "
                f"model.max_seq_len={max_seq_len} leaves no room for its history; use max_seq_len >= "
                f"{data.num_contextual + worst + 1}"
            )
        self.max_seq_len = max_seq_len
        kept = np.minimum(samples.history_lengths, room) if use_history else np.zeros(samples.num_samples, np.int64)
        self.history_end = samples.history_end
        self.history_begin = samples.history_end - kept
        self.lengths = data.num_contextual + kept + samples.num_candidates  # tokens per sample


def make_batch(
    data: IndexedSamples,
    layout: SequenceLayout,
    chunk: np.ndarray,
    *,
    key_base: Optional[np.ndarray] = None,
    dropout_seed: int = 0,
) -> RankingBatch:
    """The batch of samples ``chunk`` (sample indices, in this order). ``key_base``: each
    sample's first dropout key (training: its index in the global batch x ``max_seq_len``);
    None leaves the batch without keys (evaluation)."""
    samples = data.samples
    c = data.num_contextual
    hist_begin, hist_end = layout.history_begin[chunk], layout.history_end[chunk]
    hist_len = hist_end - hist_begin
    cand_begin, cand_end = samples.candidate_offsets[chunk], samples.candidate_offsets[chunk + 1]
    cand_len = cand_end - cand_begin
    lengths = c + hist_len + cand_len
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    events, events_user = _ranges(hist_begin, hist_len)
    cands, cands_user = _ranges(cand_begin, cand_len)
    within_history = np.arange(events.size) - np.repeat(np.cumsum(hist_len) - hist_len, hist_len)
    within_candidates = np.arange(cands.size) - np.repeat(np.cumsum(cand_len) - cand_len, cand_len)
    query = data.query_times[chunk]
    history_index = offsets[events_user] + c + within_history
    candidate_index = offsets[cands_user] + c + hist_len[cands_user] + within_candidates
    contextual_index = (offsets[:-1, None] + np.arange(c)[None, :]).reshape(-1)
    stamps = np.empty(int(offsets[-1]), dtype=np.int64)
    stamps[contextual_index] = np.repeat(query, c)
    stamps[history_index] = data.history_timestamps[events]
    stamps[candidate_index] = data.candidate_timestamps[cands]
    oracle = data.oracle[cands]
    as_long = lambda values: torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))  # noqa: E731
    return RankingBatch(
        offsets=as_long(offsets),
        num_targets=as_long(cand_len),
        token_timestamps=torch.from_numpy(stamps),
        contextual_ids=_table_ids(data.tables, data.contextual_tables, data.contextual_ids[chunk]),
        contextual_index=as_long(contextual_index),
        history_ids=_table_ids(data.tables, data.history_tables, data.history_ids[events]),
        history_actions=as_long(data.history_actions[events]),
        history_watchtimes=torch.from_numpy(data.history_watchtimes[events].astype(np.float32)),
        history_positions=as_long(np.repeat(hist_len, hist_len) - within_history),
        history_gaps=as_long(np.repeat(query, hist_len) - data.history_timestamps[events]),
        history_index=as_long(history_index),
        candidate_ids=_table_ids(data.tables, data.candidate_tables, data.candidate_ids[cands]),
        candidate_timestamps=as_long(data.candidate_timestamps[cands]),
        candidate_gaps=as_long(np.repeat(query, cand_len) - data.candidate_timestamps[cands]),
        candidate_index=as_long(candidate_index),
        labels=torch.from_numpy(data.labels[cands].astype(np.float32)),
        user_ids=as_long(samples.user_ids[chunk][cands_user]),
        oracle=None if np.isnan(oracle).all() else torch.from_numpy(oracle),
        max_len=int(lengths.max()) if lengths.size else 0,
        token_keys=None if key_base is None else as_long(np.repeat(key_base, lengths) + _positions(offsets)),
        dropout_seed=dropout_seed,
    )


def _positions(offsets: np.ndarray) -> np.ndarray:
    """Each token's position in its sequence."""
    lengths = np.diff(offsets)
    return np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)


def _ranges(begins: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ``[begin, begin + length)`` ranges and the range each element is from."""
    owner = np.repeat(np.arange(begins.size), lengths)
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return begins[owner] + np.arange(owner.size) - first, owner


def _table_ids(tables, names: tuple[str, ...], dense: np.ndarray) -> torch.Tensor:
    out = torch.empty(dense.shape, dtype=torch.int64)
    for i, name in enumerate(names):
        out[:, i] = tables[name].table_ids(dense[:, i])
    return out


class RankingTrainingBatches(StepStream):
    """Micro-batches of one data-parallel rank over the training samples, one optimizer
    step at a time; ``consumed_samples`` (the stream position) is the whole state
    (:class:`StepStream`)."""

    def __init__(
        self,
        data: IndexedSamples,
        layout: SequenceLayout,
        *,
        micro_batch_size: int,
        num_micro_batches: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        partition_fn: PartitionFn = contiguous_partition,
    ):
        self.samples = np.flatnonzero(data.samples.split == TRAIN)
        if self.samples.size == 0:
            raise ValueError("the data has no training samples")
        super().__init__(
            num_examples=self.samples.size, micro_batch_size=micro_batch_size, num_micro_batches=num_micro_batches,
            seed=seed, dp_rank=dp_rank, dp_size=dp_size, partition_fn=partition_fn,
        )
        self.data, self.layout = data, layout

    def _next_global_samples(self) -> tuple[int, np.ndarray]:
        """The next step's stream position and its global batch (sample indices)."""
        first, examples = self._next_global_batch()
        return first, self.samples[examples]

    def next_step(self) -> list[RankingBatch]:
        first, chosen = self._next_global_samples()
        dropout_seed = step_dropout_seed(self.seed, first)
        return [
            make_batch(
                self.data, self.layout, chosen[part], key_base=part.astype(np.int64) * self.layout.max_seq_len,
                dropout_seed=dropout_seed,
            )
            for part in self._my_parts(self.layout.lengths[chosen])
        ]


def ranking_evaluation_batches(
    data: IndexedSamples, layout: SequenceLayout, which: str, *, batch_size: int, dp_rank: int = 0, dp_size: int = 1
) -> Iterator[RankingBatch]:
    """Every sample of ``which`` (valid or test) once; samples are split into ``dp_size``
    contiguous blocks."""
    chosen = np.flatnonzero(data.samples.split == SPLITS[which])
    mine = np.array_split(chosen, dp_size)[dp_rank]
    for first in range(0, mine.size, batch_size):
        yield make_batch(data, layout, mine[first : first + batch_size])
