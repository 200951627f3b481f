"""Jagged training and evaluation batches from a leave-one-out split.

Training reads an endless, deterministic stream of examples (windows of a user's training
events, :mod:`megatron_gr.data.windows`; one per user by default): epoch e is a permutation
drawn from ``(seed, e)``, and the stream position (``consumed_samples``) is the whole loader
state, so a resumed run continues with exactly the batches it would have seen.

Each optimizer step takes one global batch from the stream and partitions it into
micro-batches of ``micro_batch_size`` examples; data-parallel rank r takes the r-th block of
``num_micro_batches`` of them. The partition depends only on the global batch and the
partition function, never on the number of ranks.

What the step's objective draws is drawn once per global batch, from the run seed and the
step's position in the stream, so no cut of the global batch into micro-batches or ranks
changes it: the sampled-softmax negatives (uniform over the corpus, and in-batch from the
labels of the whole global batch), carried by every micro-batch, and the dropout seed.
Each token's dropout key names its sample by its index in the global batch.
"""

from __future__ import annotations

import heapq
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from megatron_gr.data.errors import DataFormatError
from megatron_gr.data.item_space import ItemSpace
from megatron_gr.data.jagged import JaggedBatch
from megatron_gr.data.sequences import LeaveOneOutSplit
from megatron_gr.data.windows import training_windows
from megatron_gr.seeding import derive_seed

# partition_fn(samples of one global batch, their token counts, number of micro-batches) ->
# the samples of each micro-batch, equal in number.
PartitionFn = Callable[[np.ndarray, np.ndarray, int], Sequence[np.ndarray]]


def contiguous_partition(users: np.ndarray, token_counts: np.ndarray, num_parts: int) -> list[np.ndarray]:
    """Micro-batch g takes the g-th contiguous block of the shuffled global batch."""
    return list(np.array_split(users, num_parts))


def attention_cost_partition(users: np.ndarray, token_counts: np.ndarray, num_parts: int) -> list[np.ndarray]:
    """Equal-size micro-batches with nearly equal attention cost (sum of squared lengths).

    Jagged attention costs about L^2 per sequence, so cutting the stream in order can give
    one micro-batch (and its data-parallel rank) several times the work of another. Greedy
    longest-processing-time: users by decreasing cost, each to the cheapest micro-batch that
    still has room. Deterministic (ties go to the earlier user and the lower micro-batch);
    each micro-batch keeps its users in stream order.
    """
    sizes = [part.size for part in np.array_split(np.arange(users.size), num_parts)]
    cost = token_counts.astype(np.float64) ** 2
    heap = [(0.0, part) for part in range(num_parts) if sizes[part] > 0]
    heapq.heapify(heap)
    members: list[list[int]] = [[] for _ in range(num_parts)]
    for index in np.argsort(-cost, kind="stable"):
        load, part = heapq.heappop(heap)
        members[part].append(int(index))
        if len(members[part]) < sizes[part]:
            heapq.heappush(heap, (load + cost[index], part))
    return [users[np.sort(np.asarray(m, dtype=np.int64))] for m in members]


PARTITIONS = {"none": contiguous_partition, "attention_cost": attention_cost_partition}


def step_dropout_seed(seed: int, first_sample: int) -> int:
    """The dropout seed of the step whose global batch starts at stream position
    ``first_sample``."""
    return derive_seed(seed, "dropout", first_sample)


class StepStream:
    """The position in an endless stream of ``num_examples`` examples (epoch e a permutation
    drawn from ``derive_seed(seed, "data", e)``) and the cut of each global batch into this
    data-parallel rank's micro-batches. ``consumed_samples`` is the whole state; subclasses
    build the batches."""

    def __init__(
        self,
        *,
        num_examples: int,
        micro_batch_size: int,
        num_micro_batches: int,
        seed: int,
        dp_rank: int,
        dp_size: int,
        partition_fn: PartitionFn,
    ):
        self.num_examples = num_examples
        self.micro_batch_size = micro_batch_size
        self.num_micro_batches = num_micro_batches
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.partition_fn = partition_fn
        self.consumed_samples = 0

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_micro_batches * self.dp_size

    def _stream(self, first: int, count: int) -> np.ndarray:
        """Examples (in ``[0, num_examples)``) at stream positions ``[first, first + count)``."""
        n = self.num_examples
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            epoch, offset = divmod(first + filled, n)
            order = np.random.default_rng(derive_seed(self.seed, "data", epoch)).permutation(n)
            take = min(count - filled, n - offset)
            out[filled : filled + take] = order[offset : offset + take]
            filled += take
        return out

    def _next_global_batch(self) -> tuple[int, np.ndarray]:
        """The next step's stream position and its global batch of examples; advances the stream."""
        first = self.consumed_samples
        examples = self._stream(first, self.global_batch_size)
        self.consumed_samples += self.global_batch_size
        return first, examples

    def _my_parts(self, token_counts: np.ndarray) -> Sequence[np.ndarray]:
        """This rank's micro-batches, as indices into the global batch (the index keys a
        sample's dropout), from the token counts of the global batch's samples."""
        parts = self.partition_fn(np.arange(token_counts.size), token_counts, self.num_micro_batches * self.dp_size)
        return parts[self.dp_rank * self.num_micro_batches : (self.dp_rank + 1) * self.num_micro_batches]

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])


def _gather_windows(split: LeaveOneOutSplit, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated event indices of ``[starts[i], ends[i])`` for every i, and offsets."""
    lengths = ends - starts
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    return index, offsets


def _batch(
    split: LeaveOneOutSplit, items: ItemSpace, users: np.ndarray, index: np.ndarray, offsets: np.ndarray, **extra
) -> JaggedBatch:
    seqs = split.sequences
    lengths = np.diff(offsets)
    return JaggedBatch(
        item_ids=items.table_ids(seqs.item_ids[index]),
        timestamps=torch.from_numpy(seqs.timestamps[index].astype(np.int64)),
        # Every token's next event is in its own user's sequence: the training label (a
        # window's last event is never a token) or, in evaluation, the next input or the target.
        query_timestamps=torch.from_numpy(seqs.timestamps[index + 1].astype(np.int64)),
        ratings=torch.from_numpy(seqs.ratings[index].astype(np.float32)),
        offsets=torch.from_numpy(offsets),
        user_ids=torch.from_numpy(seqs.user_ids[users].astype(np.int64)),
        max_len=int(lengths.max()) if lengths.size else 0,
        **extra,
    )


def training_users(split: LeaveOneOutSplit) -> np.ndarray:
    """Users with a training example: two training events (an input and the next item)."""
    starts, ends = split.input_range("train")
    return np.flatnonzero(ends - starts >= 2)


class TrainingBatches(StepStream):
    """Micro-batches of one data-parallel rank, one optimizer step at a time.

    A training example is a window of ``max_seq_len + 1`` (or fewer) consecutive training
    events of one user: tokens are all but the last, ``labels`` the event that follows each
    token. ``windows='latest'`` serves each user's most recent window, ``'all'`` windows
    covering every training event (:func:`training_windows`). Item ids are those the item
    table is keyed by (``items``); negatives are given in the same ids. Each step's
    ``negative_ids`` are ``num_negatives`` items uniform over the corpus, then
    ``num_in_batch_negatives`` labels drawn uniformly from all the labels of the global
    batch (popular items in proportion to their frequency).
    """

    def __init__(
        self,
        split: LeaveOneOutSplit,
        items: ItemSpace,
        *,
        max_seq_len: int,
        micro_batch_size: int,
        num_micro_batches: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        partition_fn: PartitionFn = contiguous_partition,
        windows: str = "latest",
        num_negatives: int = 0,
        num_in_batch_negatives: int = 0,
    ):
        starts, ends = split.input_range("train")
        self.split = split
        examples = training_windows(starts, ends, max_seq_len=max_seq_len, mode=windows)
        if examples.users.size == 0:
            raise DataFormatError(
                "no user has two training events (four in all: leave-one-out holds out the last "
                "two); training needs at least one (input, next item) pair"
            )
        super().__init__(
            num_examples=examples.users.size, micro_batch_size=micro_batch_size, num_micro_batches=num_micro_batches,
            seed=seed, dp_rank=dp_rank, dp_size=dp_size, partition_fn=partition_fn,
        )
        # Per example: its user and its events [starts, ends).
        self.example_users, self.starts, self.ends = examples.users, examples.starts, examples.ends
        self.max_seq_len = max_seq_len
        self.items = items
        self.num_negatives = num_negatives
        self.num_in_batch_negatives = num_in_batch_negatives

    def _negatives(self, examples: np.ndarray, tokens: np.ndarray, first: int) -> torch.Tensor:
        """The step's negatives ``[num_negatives + num_in_batch_negatives]`` (table ids)."""
        rng = np.random.default_rng(derive_seed(self.seed, "negatives", first))
        uniform = rng.integers(1, self.split.sequences.num_items + 1, self.num_negatives)  # dense corpus ids
        ends = np.cumsum(tokens)  # a sample has one label per token
        picks = rng.integers(0, ends[-1], self.num_in_batch_negatives)
        sample = np.searchsorted(ends, picks, side="right")
        label_events = self.starts[examples[sample]] + 1 + picks - (ends - tokens)[sample]
        return self.items.table_ids(np.concatenate([uniform, self.split.sequences.item_ids[label_events]]))

    def next_step(self) -> list[JaggedBatch]:
        first, examples = self._next_global_batch()
        tokens = self.ends[examples] - self.starts[examples] - 1  # a window's last event is only a label
        negatives = self._negatives(examples, tokens, first)
        dropout_seed = step_dropout_seed(self.seed, first)
        batches = []
        for samples in self._my_parts(tokens):  # indices into the global batch
            chunk = examples[samples]
            index, offsets = _gather_windows(self.split, self.starts[chunk], self.ends[chunk])
            # Tokens: every window event but the last; labels: every event but the first.
            lengths = np.diff(offsets) - 1
            token_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            is_last = np.zeros(index.size, dtype=bool)
            is_last[offsets[1:] - 1] = True
            is_first = np.zeros(index.size, dtype=bool)
            is_first[offsets[:-1]] = True
            labels = self.items.table_ids(self.split.sequences.item_ids[index[~is_first]])
            positions = np.arange(token_offsets[-1]) - np.repeat(token_offsets[:-1], lengths)
            token_keys = np.repeat(samples.astype(np.int64) * self.max_seq_len, lengths) + positions
            batches.append(
                _batch(
                    self.split, self.items, self.example_users[chunk], index[~is_last], token_offsets,
                    labels=labels,
                    negative_ids=negatives,
                    token_keys=torch.from_numpy(token_keys),
                    dropout_seed=dropout_seed,
                )
            )
        return batches


def evaluation_batches(
    split: LeaveOneOutSplit,
    items: ItemSpace,
    which: str,
    *,
    max_seq_len: int,
    batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> Iterator[JaggedBatch]:
    """Every user of ``which`` (valid or test) once: input = the most recent ``max_seq_len``
    events before the target. Users are split into ``dp_size`` contiguous blocks. Item ids
    as in :class:`TrainingBatches`."""
    starts, ends = split.input_range(which)
    targets = split.targets(which)
    users = np.array_split(np.arange(starts.size), dp_size)[dp_rank]
    starts = np.maximum(starts, ends - max_seq_len)
    for first in range(0, users.size, batch_size):
        chunk = users[first : first + batch_size]
        index, offsets = _gather_windows(split, starts[chunk], ends[chunk])
        yield _batch(split, items, chunk, index, offsets, target_ids=items.table_ids(targets[chunk]))
