"""Training windows: which events are labels ('latest' vs 'all', by hand and on random
lengths), and the loader serving them with every token's query time."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_gr.data import LeaveOneOutSplit, UserSequences
from megatron_gr.data.item_space import ItemSpace
from megatron_gr.data.loader import TrainingBatches, evaluation_batches
from megatron_gr.data.sequences import RawEvents
from megatron_gr.data.windows import training_windows

# Users' training events: [0, 7) (7 events), [7, 8) (1 event: no label), [8, 10) (2 events).
STARTS, ENDS = np.array([0, 7, 8]), np.array([7, 8, 10])


def test_latest_windows_by_hand():
    w = training_windows(STARTS, ENDS, max_seq_len=3, mode="latest")
    assert (w.users.tolist(), w.starts.tolist(), w.ends.tolist()) == ([0, 2], [3, 8], [7, 10])


def test_all_windows_by_hand():
    # user 0: labels 1..6 in windows [3, 7) (labels 4, 5, 6) and [0, 4) (labels 1, 2, 3)
    w = training_windows(STARTS, ENDS, max_seq_len=3, mode="all")
    assert (w.users.tolist(), w.starts.tolist(), w.ends.tolist()) == ([0, 0, 2], [3, 0, 8], [7, 4, 10])
    # a window shorter than max_seq_len + 1 at the user's start: 5 labels, windows of 3 -> [3, 7) and [1, 4)
    w = training_windows(np.array([1]), np.array([7]), max_seq_len=3, mode="all")
    assert (w.starts.tolist(), w.ends.tolist()) == ([3, 1], [7, 4])


@pytest.mark.parametrize("max_seq_len", [1, 2, 5, 50])
def test_all_windows_label_every_event_but_the_first_once(max_seq_len):
    rng = np.random.default_rng(max_seq_len)
    lengths = rng.integers(0, 120, 40)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    w = training_windows(starts, ends, max_seq_len=max_seq_len, mode="all")
    assert (w.ends - w.starts).max() <= max_seq_len + 1 and (w.ends - w.starts).min() >= 2
    labels = np.concatenate([np.arange(s + 1, e) for s, e in zip(w.starts, w.ends)])
    expected = np.concatenate([np.arange(s + 1, e) for s, e in zip(starts, ends)])
    assert np.array_equal(np.sort(labels), expected)  # each once
    assert np.array_equal(np.unique(w.users), np.flatnonzero(lengths >= 2))


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="choose one of"):
        training_windows(STARTS, ENDS, max_seq_len=3, mode="every")


def _split() -> LeaveOneOutSplit:
    # user 1: 9 events at t = 0, 10, ..., 80; user 2: 4 events at 1000, 1001, 1002, 1003
    users = np.array([1] * 9 + [2] * 4)
    times = np.concatenate([np.arange(9) * 10, 1000 + np.arange(4)])
    items = np.arange(1, 14)
    events = RawEvents(users, items, times, np.ones(13, dtype=np.float32))
    return LeaveOneOutSplit.build(UserSequences.from_events(events))


def test_loader_serves_every_window_once_per_epoch_with_query_times():
    split = _split()
    # training events: user 1 items 1..7 (t 0..60), user 2 items 10, 11 (t 1000, 1001)
    items = ItemSpace(vocab=split.sequences.item_vocab, raw_keys=False)
    loader = TrainingBatches(split, items, max_seq_len=3, micro_batch_size=3, num_micro_batches=1, seed=0, windows="all")
    (batch,) = loader.next_step()
    got = sorted(zip(np.split(batch.labels.numpy(), batch.offsets[1:-1].numpy()),
                     np.split(batch.query_timestamps.numpy(), batch.offsets[1:-1].numpy())), key=lambda x: x[0][0])
    # windows: user 1 [items 4..7] and [1..4] (labels 5, 6, 7 and 2, 3, 4), user 2 [10, 11] (label 11)
    assert [g[0].tolist() for g in got] == [[2, 3, 4], [5, 6, 7], [11]]
    # a token's query time is its label's timestamp
    assert [g[1].tolist() for g in got] == [[10, 20, 30], [40, 50, 60], [1001]]


def test_evaluation_query_time_of_the_last_token_is_the_targets():
    split = _split()
    (batch,) = evaluation_batches(split, ItemSpace(vocab=split.sequences.item_vocab, raw_keys=False), "test",
                                  max_seq_len=3, batch_size=8)
    ends = batch.offsets[1:] - 1
    # test targets: user 1 item 9 at t 80, user 2 item 13 at t 1003; inputs end at 70 and 1002
    assert batch.target_ids.tolist() == [9, 13]
    assert batch.timestamps[ends].tolist() == [70, 1002]
    assert batch.query_timestamps[ends].tolist() == [80, 1003]
    # user 1 inputs t 50, 60, 70: earlier tokens' query times are the next inputs'
    assert batch.query_timestamps[:2].tolist() == [60, 70]
