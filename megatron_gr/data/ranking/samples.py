"""Ranking samples in columns, as every ranking source produces them.

A sample is one request of one user: the user's contextual features, the history of events
before the request and the candidates shown at it, each candidate with its labels. For two
users, the second with two requests::

    user_ids          = [ua, ub, ub]                         # [S]
    contextual[c]     = [..., ..., ...]                      # [S] raw values per column
    history_begin/end = [0, 3, 3] / [3, 5, 7]                # event ranges (may overlap: a
    events[c]         = [a0 a1 a2 | b0 b1 b2 b3]             # later request sees more history)
    candidate_offsets = [0, 2, 5, 7]                         # [S + 1]
    candidates[c]     = [x0 x1 | y0 y1 y2 | z0 z1]           # ids, timestamps and labels

Values are raw (any int64 id; labels and watch times as floats); the run's tables give ids
their dense numbers later (``indexed.py``). ``oracle`` holds, where a generator knows it, the
true probability that a candidate's label has a task's bits, keyed ``"<label>&<bitmask>"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TRAIN, VALID, TEST = 0, 1, 2
SPLITS = {"train": TRAIN, "valid": VALID, "test": TEST}


@dataclass
class RankingSamples:
    user_ids: np.ndarray
    """``[S]`` int64 raw user id of each sample (GAUC groups by it)."""
    split: np.ndarray
    """``[S]`` int8: TRAIN, VALID or TEST."""
    contextual: dict[str, np.ndarray]
    """Column -> ``[S]`` int64 raw values."""
    history_begin: np.ndarray
    """``[S]`` int64: first event of the sample's history."""
    history_end: np.ndarray
    """``[S]`` int64: one past its last event (the history is time-sorted)."""
    events: dict[str, np.ndarray]
    """Column -> ``[E]`` values of the history events."""
    candidate_offsets: np.ndarray
    """``[S + 1]`` int64 into the candidate columns."""
    candidates: dict[str, np.ndarray]
    """Column -> ``[N]`` values of the candidates (features, timestamps, labels)."""
    oracle: dict[str, np.ndarray] = field(default_factory=dict)
    """``"<label>&<bitmask>"`` -> ``[N]`` float64 true probability of a positive."""

    @property
    def num_samples(self) -> int:
        return self.user_ids.shape[0]

    @property
    def num_candidates(self) -> np.ndarray:
        return np.diff(self.candidate_offsets)

    @property
    def history_lengths(self) -> np.ndarray:
        return self.history_end - self.history_begin

    def count(self, which: str) -> int:
        return int((self.split == SPLITS[which]).sum())

    def validate(self) -> None:
        """Checks the shapes and ranges (a generator's or reader's bug, not user input)."""
        s = self.num_samples
        for name, values in self.contextual.items():
            assert values.shape == (s,), f"contextual column {name} has shape {values.shape}, expected ({s},)"
        assert self.split.shape == (s,) and self.history_begin.shape == (s,) and self.history_end.shape == (s,)
        assert self.candidate_offsets.shape == (s + 1,) and self.candidate_offsets[0] == 0
        assert (np.diff(self.candidate_offsets) >= 1).all(), "every sample needs a candidate"
        num_events = {v.shape[0] for v in self.events.values()}
        assert len(num_events) <= 1, f"event columns differ in length: {num_events}"
        e = num_events.pop() if num_events else 0
        assert (self.history_begin <= self.history_end).all() and (self.history_end <= e).all()
        n = int(self.candidate_offsets[-1])
        for name, values in {**self.candidates, **self.oracle}.items():
            assert values.shape == (n,), f"candidate column {name} has shape {values.shape}, expected ({n},)"


def split_by_time(user_ids: np.ndarray, query_times: np.ndarray) -> np.ndarray:
    """Each user's latest request is the test sample and the one before it the validation
    sample, the rest train (as the retrieval split holds out each user's last events).
    Ties in time keep input order. Users with fewer than 3 requests only train."""
    n = user_ids.size
    order = np.lexsort((np.arange(n), query_times, user_ids))
    users = user_ids[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if n else np.zeros(0, dtype=np.int64)
    counts = np.diff(np.r_[starts, n])
    from_end = np.repeat(starts + counts, counts) - np.arange(n) - 1  # 0: the user's latest request
    eligible = np.repeat(counts >= 3, counts)
    split = np.full(n, TRAIN, dtype=np.int8)
    split[order[eligible & (from_end == 0)]] = TEST
    split[order[eligible & (from_end == 1)]] = VALID
    return split


def window_samples(
    sequence_offsets: np.ndarray, window: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Samples cut from time-sorted per-user event sequences: from the end of each
    sequence, windows of ``window`` consecutive events are the candidates of one sample and
    everything before a window its history. A user's last window is test, the one before it
    valid, earlier ones train; windows with no history are skipped.

    Returns (user index, first candidate event, candidate count, split) per sample, in user
    order and, within a user, in time order.
    """
    users, starts, counts, splits = [], [], [], []
    for user in range(sequence_offsets.size - 1):
        begin, end = int(sequence_offsets[user]), int(sequence_offsets[user + 1])
        windows = []
        stop = end
        while stop - window > begin:  # the window keeps at least one history event
            windows.append(stop - window)
            stop -= window
        for rank, start in enumerate(reversed(windows)):
            users.append(user)
            starts.append(start)
            counts.append(window)
            back = len(windows) - 1 - rank
            splits.append(TEST if back == 0 else VALID if back == 1 else TRAIN)
    as_int = lambda values: np.asarray(values, dtype=np.int64)  # noqa: E731
    return as_int(users), as_int(starts), as_int(counts), np.asarray(splits, dtype=np.int8)
