"""Repeated (user, item, timestamp) events: found exactly, removed keeping the first, and the
leave-one-out leak they cause is gone once they are removed."""

from __future__ import annotations

import numpy as np

from megatron_gr.data import LeaveOneOutSplit, UserSequences, duplicate_events, read_movielens
from tests.unit.data.test_sequences import make_events, raw_items


def test_repeats_by_hand_keep_the_first_in_file_order():
    rows = [  # (user, raw item, timestamp) in file order
        (1, 10, 5), (1, 20, 5), (1, 10, 5),  # a repeat two events later in a tie run: repeat
        (1, 10, 6),  # the same item at another time: not a repeat
        (2, 10, 5),  # another user: not a repeat
        (1, 30, 4), (1, 30, 4), (1, 30, 4),  # three times: two repeats
    ]
    sequences = UserSequences.from_events(make_events(rows))
    # user 1 sorted by time (ties in file order): 30, 30, 30 @4; 10, 20, 10 @5; 10 @6; user 2: 10 @5
    assert raw_items(sequences, 0, 8) == [30, 30, 30, 10, 20, 10, 10, 10]
    assert duplicate_events(sequences).tolist() == [False, True, True, False, False, True, False, False]
    kept = sequences.select_events(~duplicate_events(sequences))
    assert kept.offsets.tolist() == [0, 4, 5]
    assert raw_items(kept, 0, 5) == [30, 10, 20, 10, 10]
    assert kept.timestamps.tolist() == [4, 5, 5, 6, 5]
    assert kept.item_vocab.tolist() == sequences.item_vocab.tolist()


def test_repeats_match_a_first_seen_set_on_many_ties():
    rng = np.random.default_rng(4)
    n = 4000
    rows = list(zip(rng.integers(0, 30, n), rng.integers(0, 12, n), rng.integers(0, 8, n)))
    sequences = UserSequences.from_events(make_events(rows))
    order = sorted(range(n), key=lambda i: (rows[i][0], rows[i][2]))  # the stable sort of from_events
    seen, expected = set(), []
    for i in order:
        expected.append(tuple(rows[i]) in seen)
        seen.add(tuple(rows[i]))
    assert duplicate_events(sequences).tolist() == expected
    assert n // 4 < sum(expected) < n  # neither vacuous nor all repeats


def test_no_events_and_no_ties_have_no_repeats():
    rows = [(1, 10, 1), (1, 10, 2), (2, 10, 1)]
    assert not duplicate_events(UserSequences.from_events(make_events(rows))).any()
    one = UserSequences.from_events(make_events([(1, 10, 1)]))
    assert duplicate_events(one).tolist() == [False]


def test_a_file_of_doubled_lines_leaks_targets_until_deduplicated(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for user in range(1, 21):
        items = rng.choice(np.arange(1, 200), size=8, replace=False)
        lines += [f"{user}\t{item}\t4\t{1000 + 60 * t}" for t, item in enumerate(items)]
    (tmp_path / "once").mkdir()
    (tmp_path / "twice").mkdir()
    (tmp_path / "once" / "u.data").write_text("\n".join(lines) + "\n")
    (tmp_path / "twice" / "u.data").write_text("".join(f"{line}\n{line}\n" for line in lines))
    once = UserSequences.from_events(read_movielens(tmp_path / "once"))
    twice = UserSequences.from_events(read_movielens(tmp_path / "twice"))

    # Kept, every test target is also the last event of its user's input: a model that
    # repeats the last item would score HR@1 = 1.
    leaky = LeaveOneOutSplit.build(twice)
    starts, ends = leaky.input_range("test")
    assert (leaky.sequences.item_ids[ends - 1] == leaky.targets("test")).all()

    repeated = duplicate_events(twice)
    assert repeated.sum() == len(lines)
    deduplicated = twice.select_events(~repeated)
    for name in ("user_ids", "offsets", "item_ids", "timestamps", "ratings", "item_vocab"):
        np.testing.assert_array_equal(getattr(deduplicated, name), getattr(once, name))
    clean = LeaveOneOutSplit.build(deduplicated)
    starts, ends = clean.input_range("test")
    assert not (clean.sequences.item_ids[ends - 1] == clean.targets("test")).any()
