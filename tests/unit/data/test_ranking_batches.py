"""Indexing and batching of ranking samples: shared table numbering, raw keys for dynamic
tables, task labels from bitmasks, the interleaved token order [contextual | history |
candidates] with the candidate counts, encodings' inputs, truncation, and a training
stream that gives every data-parallel layout the same micro-batches."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_gr.config.ranking_config import FeatureGroupsConfig
from megatron_gr.data.errors import DataFormatError
from megatron_gr.data.loader import attention_cost_partition
from megatron_gr.data.ranking import TEST, TRAIN, VALID, RankingSamples
from megatron_gr.data.ranking.indexed import TaskLabel, index_samples
from megatron_gr.data.ranking.loader import RankingTrainingBatches, SequenceLayout, make_batch, ranking_evaluation_batches

FEATURES = FeatureGroupsConfig(
    contextual={"segment": "segment", "activity": "activity"},
    uih={"item_id": "item"},
    uih_action="action",
    uih_watchtime="watch_time",
    uih_timestamp="timestamp",
    candidate={"cand_item_id": "item"},
    candidate_timestamp="cand_timestamp",
)
TASKS = [TaskLabel("click", "cand_action", 1), TaskLabel("like", "cand_action", 2), TaskLabel("watch", "cand_watch_time", None)]


def two_users() -> RankingSamples:
    """User 100: history events 0..2 (items 50, 70, 50), 2 candidates (items 90, 70).
    User 200: history event 3 (item 60), 1 candidate (item 50). Raw item ids are sparse."""
    return RankingSamples(
        user_ids=np.array([100, 200]),
        split=np.array([TRAIN, TEST], dtype=np.int8),
        contextual={"segment": np.array([3, 1]), "activity": np.array([2, 2])},
        history_begin=np.array([0, 3]),
        history_end=np.array([3, 4]),
        events={
            "item_id": np.array([50, 70, 50, 60]),
            "action": np.array([1, 0, 3, 2]),
            "watch_time": np.array([4.0, 0.5, 9.0, 1.0]),
            "timestamp": np.array([10, 20, 40, 5]),
        },
        candidate_offsets=np.array([0, 2, 3]),
        candidates={
            "cand_item_id": np.array([90, 70, 50]),
            "cand_timestamp": np.array([100, 110, 30]),
            "cand_action": np.array([3.0, 0.0, 2.0]),
            "cand_watch_time": np.array([7.5, 0.0, 1.5]),
        },
        oracle={"cand_action&1": np.array([0.9, 0.2, 0.4])},
    )


def indexed(raw_keyed=frozenset()):
    return index_samples(two_users(), features=FEATURES, tasks=TASKS, raw_keyed_tables=set(raw_keyed), source="test")


def test_tables_number_every_feature_they_serve_and_labels_follow_the_bitmasks():
    data = indexed()
    item = data.tables["item"]
    assert item.vocab.tolist() == [-1, 50, 60, 70, 90]  # history and candidate ids, one numbering
    assert data.history_ids[:, 0].tolist() == [1, 3, 1, 2] and data.candidate_ids[:, 0].tolist() == [4, 3, 1]
    assert data.labels.tolist() == [[1, 1, 7.5], [0, 0, 0], [0, 1, 1.5]]
    assert data.query_times.tolist() == [110, 30]
    assert data.oracle[:, 0].tolist() == [0.9, 0.2, 0.4] and np.isnan(data.oracle[:, 1:]).all()
    raw = make_batch(indexed({"item"}), SequenceLayout(indexed({"item"}), max_seq_len=20, use_history=True), np.array([0]))
    assert raw.history_ids[:, 0].tolist() == [50, 70, 50] and raw.candidate_ids[:, 0].tolist() == [90, 70]


def test_the_batch_interleaves_contextual_history_and_candidates():
    data = indexed()
    batch = make_batch(data, SequenceLayout(data, max_seq_len=20, use_history=True), np.array([0, 1]))
    # user 100: [c c h h h k k] = 7 tokens; user 200: [c c h k] = 4 tokens.
    assert batch.offsets.tolist() == [0, 7, 11] and batch.max_len == 7 and batch.num_tokens == 11
    assert batch.num_targets.tolist() == [2, 1] and batch.num_candidates == 3
    assert batch.contextual_index.tolist() == [0, 1, 7, 8]
    assert batch.history_index.tolist() == [2, 3, 4, 9]
    assert batch.candidate_index.tolist() == [5, 6, 10]
    assert batch.contextual_ids.tolist() == [[2, 1], [1, 1]]  # dense ids of segment {1, 3}, activity {2}
    assert batch.history_positions.tolist() == [3, 2, 1, 1]  # events back from the query
    assert batch.history_gaps.tolist() == [100, 90, 70, 25]  # query times 110 and 30
    assert batch.candidate_gaps.tolist() == [10, 0, 0]
    assert batch.token_timestamps.tolist() == [110, 110, 10, 20, 40, 100, 110, 30, 30, 5, 30]
    assert batch.history_actions.tolist() == [1, 0, 3, 2] and batch.history_watchtimes.tolist() == [4.0, 0.5, 9.0, 1.0]
    assert batch.user_ids.tolist() == [100, 100, 200]
    assert batch.labels[:, 0].tolist() == [1, 0, 0] and batch.oracle.shape == (3, 3)


def test_histories_keep_their_latest_events_or_none():
    data = indexed()
    short = make_batch(data, SequenceLayout(data, max_seq_len=6, use_history=True), np.array([0]))
    assert short.num_tokens == 6 and short.history_ids[:, 0].tolist() == [3, 1]  # the last 2 of 3 events
    assert short.history_positions.tolist() == [2, 1]
    flat = make_batch(data, SequenceLayout(data, max_seq_len=6, use_history=False), np.array([0, 1]))
    assert flat.offsets.tolist() == [0, 4, 7] and flat.history_index.numel() == 0
    assert flat.candidate_index.tolist() == [2, 3, 6]
    with pytest.raises(ValueError, match="model.max_seq_len=4 leaves no room for its history; use max_seq_len >= 5"):
        SequenceLayout(data, max_seq_len=4, use_history=True)


def test_bad_labels_are_data_errors():
    samples = two_users()
    samples.candidates["cand_action"] = np.array([1.5, 0.0, 1.0])
    with pytest.raises(DataFormatError, match="label column cand_action .binary task click. holds 1.5"):
        index_samples(samples, features=FEATURES, tasks=TASKS, raw_keyed_tables=set(), source="test")
    samples.candidates["cand_action"] = np.array([1.0, 0.0, 1.0])
    samples.candidates["cand_watch_time"] = np.array([1.0, np.nan, 1.0])
    with pytest.raises(DataFormatError, match="label column cand_watch_time .task watch. holds nan"):
        index_samples(samples, features=FEATURES, tasks=TASKS, raw_keyed_tables=set(), source="test")


def many_users(count: int) -> RankingSamples:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 9, count)
    cands = rng.integers(1, 4, count)
    end = np.cumsum(lengths)
    n = int(cands.sum())
    return RankingSamples(
        user_ids=np.arange(count) + 1,
        split=np.where(np.arange(count) % 5 == 4, VALID, TRAIN).astype(np.int8),
        contextual={"segment": rng.integers(0, 3, count), "activity": rng.integers(0, 3, count)},
        history_begin=end - lengths,
        history_end=end,
        events={"item_id": rng.integers(1, 30, int(end[-1])), "action": rng.integers(0, 4, int(end[-1])),
                "watch_time": rng.random(int(end[-1])), "timestamp": np.arange(int(end[-1]))},
        candidate_offsets=np.concatenate([[0], np.cumsum(cands)]),
        candidates={"cand_item_id": rng.integers(1, 30, n), "cand_timestamp": np.full(n, 10_000),
                    "cand_action": rng.integers(0, 4, n).astype(float), "cand_watch_time": rng.random(n)},
    )


def test_every_data_parallel_layout_trains_on_the_same_micro_batches():
    data = index_samples(many_users(50), features=FEATURES, tasks=TASKS, raw_keyed_tables=set(), source="test")
    layout = SequenceLayout(data, max_seq_len=12, use_history=True)

    def stream(dp_size):
        ranks = [RankingTrainingBatches(data, layout, micro_batch_size=3, num_micro_batches=4 // dp_size, seed=5,
                                        dp_rank=r, dp_size=dp_size, partition_fn=attention_cost_partition)
                 for r in range(dp_size)]
        return [[b.user_ids.tolist() for rank in ranks for b in rank.next_step()] for _ in range(5)]

    single = stream(1)
    assert stream(2) == single and stream(4) == single
    seen = {u for step in single for batch in step for u in batch}
    assert seen <= {u for u in range(1, 51) if u % 5 != 0}  # training samples only (every 5th is valid)
    again = RankingTrainingBatches(data, layout, micro_batch_size=3, num_micro_batches=4, seed=5,
                                   partition_fn=attention_cost_partition)
    again.load_state_dict({"consumed_samples": 24})
    assert [b.user_ids.tolist() for b in again.next_step()] == single[2]


def test_training_tokens_carry_dropout_keys_that_no_layout_changes():
    """A token's key is its sample's index in the step's global batch x max_seq_len + its
    position; the step's seed is shared; evaluation batches have none."""
    data = index_samples(many_users(50), features=FEATURES, tasks=TASKS, raw_keyed_tables=set(), source="test")
    layout = SequenceLayout(data, max_seq_len=12, use_history=True)

    def keyed(dp_size):
        ranks = [RankingTrainingBatches(data, layout, micro_batch_size=3, num_micro_batches=4 // dp_size, seed=5,
                                        dp_rank=r, dp_size=dp_size, partition_fn=attention_cost_partition)
                 for r in range(dp_size)]
        steps = []
        for _ in range(3):
            batches = [b for rank in ranks for b in rank.next_step()]
            keys = {(int(u), int(k)) for b in batches for u, k in zip(_token_users(b), b.token_keys)}
            steps.append((keys, {b.dropout_seed for b in batches}))
        return steps

    single = keyed(1)
    assert keyed(2) == single and keyed(4) == single
    for keys, seeds in single:
        assert len(seeds) == 1 and len(keys) == len({k for _, k in keys})  # one seed; no key twice
        samples = {k // 12 for _, k in keys}
        assert samples == set(range(12))  # 12 samples per global batch
        for sample in samples:  # positions 0..length-1 of one sequence
            positions = sorted(k % 12 for _, k in keys if k // 12 == sample)
            assert positions == list(range(len(positions)))
    assert single[0][1] != single[1][1]  # a seed per step
    batch = next(ranking_evaluation_batches(data, layout, "valid", batch_size=2))
    assert batch.token_keys is None


def _token_users(batch) -> np.ndarray:
    """The user of each token."""
    lengths = np.diff(batch.offsets.numpy())
    first = np.cumsum(batch.num_targets.numpy()) - batch.num_targets.numpy()
    return np.repeat(batch.user_ids.numpy()[first], lengths)


def test_evaluation_batches_cover_a_split_once_over_ranks():
    data = index_samples(many_users(50), features=FEATURES, tasks=TASKS, raw_keyed_tables=set(), source="test")
    layout = SequenceLayout(data, max_seq_len=12, use_history=True)
    users = [u for r in range(3) for b in ranking_evaluation_batches(data, layout, "valid", batch_size=2, dp_rank=r, dp_size=3)
             for u in b.user_ids.tolist()]
    expected = [u for u in range(5, 51, 5) for _ in range(int(data.samples.num_candidates[u - 1]))]
    assert users == expected
