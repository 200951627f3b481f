"""Training examples: the windows of each user's training events that the loader serves.

A window is a run of consecutive training events ``[start, end)`` of one user; its tokens
are all events but the last and each token's label is the event after it, so a window of
``max_seq_len + 1`` events holds ``max_seq_len`` tokens and as many labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TRAIN_WINDOWS = ("latest", "all")


@dataclass(frozen=True)
class TrainingWindows:
    users: np.ndarray  # [E] int64, the user (row of the split's sequences) of each window
    starts: np.ndarray  # [E] int64, first event (index into the split's event arrays)
    ends: np.ndarray  # [E] int64, one past the last event

    @property
    def num_labels(self) -> np.ndarray:
        return self.ends - self.starts - 1


def training_windows(starts: np.ndarray, ends: np.ndarray, *, max_seq_len: int, mode: str) -> TrainingWindows:
    """The windows of users whose training events are ``[starts[u], ends[u])``.

    ``latest``: one window per user, the most recent ``max_seq_len + 1`` training events
    (earlier events of longer users are never labels). ``all``: the user's events cut from
    the end into windows of ``max_seq_len + 1`` events, consecutive windows sharing one
    event, so every training event but the user's first is a label exactly once (a label
    early in a window sees a shorter history than it would in one long sequence). Users with
    fewer than two training events have no label and no window. Windows are ordered by user,
    most recent first.
    """
    if mode not in TRAIN_WINDOWS:
        raise ValueError(f"training windows mode={mode!r}: choose one of {TRAIN_WINDOWS}")
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len={max_seq_len} must be >= 1")
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    labels = np.maximum(ends - starts - 1, 0)
    if mode == "latest":
        per_user = (labels > 0).astype(np.int64)
    else:
        per_user = -(-labels // max_seq_len)  # ceil: max_seq_len labels per window
    users = np.repeat(np.arange(starts.size, dtype=np.int64), per_user)
    # k-th window of its user (0 = most recent) ends k * max_seq_len events before the last.
    first_of_user = np.concatenate([[0], np.cumsum(per_user)[:-1]]).astype(np.int64)
    k = np.arange(users.size, dtype=np.int64) - np.repeat(first_of_user, per_user)
    window_ends = ends[users] - k * max_seq_len
    window_starts = np.maximum(starts[users], window_ends - (max_seq_len + 1))
    return TrainingWindows(users, window_starts, window_ends)
