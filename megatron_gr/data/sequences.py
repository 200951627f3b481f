"""Per-user, time-sorted event sequences and the leave-one-out split.

``UserSequences`` is columnar (numpy): all events of user ``u`` are
``item_ids[offsets[u]:offsets[u + 1]]``, sorted by timestamp; events with equal
timestamps keep the order in which they appear in the raw file (stable sort), so a split
is reproducible from the raw data alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_gr.data.errors import DataFormatError

PADDING_ITEM_ID = 0


@dataclass
class RawEvents:
    """Interaction events in file order, as readers and generators produce them."""

    users: np.ndarray  # [N] int64, raw user ids
    items: np.ndarray  # [N] int64, raw item ids (any int64 value)
    timestamps: np.ndarray  # [N] int64, seconds
    ratings: np.ndarray  # [N] float32

    def __len__(self) -> int:
        return self.users.shape[0]


@dataclass
class UserSequences:
    user_ids: np.ndarray  # [U] int64, raw user ids
    offsets: np.ndarray  # [U + 1] int64
    item_ids: np.ndarray  # [N] int64, dense ids in [1, num_items] (0 is padding)
    timestamps: np.ndarray  # [N] int64, seconds
    ratings: np.ndarray  # [N] float32
    item_vocab: np.ndarray  # [num_items + 1] int64, raw id of each dense id; item_vocab[0] = -1

    @property
    def num_users(self) -> int:
        return self.user_ids.shape[0]

    @property
    def num_items(self) -> int:
        return self.item_vocab.shape[0] - 1

    @property
    def num_events(self) -> int:
        return self.item_ids.shape[0]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_events(cls, events: RawEvents) -> "UserSequences":
        """Groups raw events (in file order) into time-sorted per-user sequences.

        Raw item ids (any int64, 2^40 and beyond) are remapped to dense ids 1..num_items in
        increasing raw-id order; ``item_vocab`` maps them back.
        """
        users = np.asarray(events.users, dtype=np.int64)
        items = np.asarray(events.items, dtype=np.int64)
        timestamps = np.asarray(events.timestamps, dtype=np.int64)
        ratings = np.asarray(events.ratings, dtype=np.float32)
        n = users.shape[0]
        if not (items.shape[0] == timestamps.shape[0] == ratings.shape[0] == n):
            raise ValueError("users, items, timestamps and ratings must have the same length")
        order = np.lexsort((timestamps, users))  # stable: ties keep file order
        users, items = users[order], items[order]
        timestamps, ratings = timestamps[order], ratings[order]
        unique_users, starts = np.unique(users, return_index=True)
        offsets = np.append(starts, n).astype(np.int64)
        vocab = np.unique(items)
        dense = np.searchsorted(vocab, items).astype(np.int64) + 1
        item_vocab = np.concatenate([np.array([-1], dtype=np.int64), vocab])
        return cls(unique_users, offsets, dense, timestamps, ratings, item_vocab)

    def select_users(self, mask: np.ndarray) -> "UserSequences":
        """Keeps the users where ``mask`` is True (item vocabulary unchanged)."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (self.num_users,):
            raise ValueError(
                f"mask has shape {mask.shape}; expected one entry per user, ({self.num_users},)"
            )
        keep = np.flatnonzero(mask)
        lengths = self.lengths[keep]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        # Event t of the result comes from its user's old start plus its place in the sequence.
        shift = np.repeat(self.offsets[keep] - offsets[:-1], lengths)
        index = shift + np.arange(offsets[-1], dtype=np.int64)
        return UserSequences(
            self.user_ids[keep], offsets, self.item_ids[index], self.timestamps[index],
            self.ratings[index], self.item_vocab,
        )

    def select_events(self, keep: np.ndarray) -> "UserSequences":
        """Keeps the events where ``keep`` is True, in order (users and vocabulary unchanged;
        a user may be left with fewer events, or none)."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (self.num_events,):
            raise ValueError(
                f"keep has shape {keep.shape}; expected one entry per event, ({self.num_events},)"
            )
        kept_before = np.concatenate([[0], np.cumsum(keep)]).astype(np.int64)
        return UserSequences(
            self.user_ids, kept_before[self.offsets], self.item_ids[keep], self.timestamps[keep],
            self.ratings[keep], self.item_vocab,
        )


@dataclass
class LeaveOneOutSplit:
    """Leave-one-out as in SASRec and HSTU: per user, the last event is the test target, the
    second last the validation target, the rest is training data.

    Train sequence of user u: events ``[start, end - 2)``; validation: input
    ``[start, end - 2)``, target ``end - 2``; test: input ``[start, end - 1)``, target ``end - 1``.
    """

    sequences: UserSequences
    num_dropped_users: int

    MIN_EVENTS = 3

    @classmethod
    def build(cls, sequences: UserSequences) -> "LeaveOneOutSplit":
        enough = sequences.lengths >= cls.MIN_EVENTS
        dropped = int((~enough).sum())
        if dropped:
            sequences = sequences.select_users(enough)
        if sequences.num_users == 0:
            raise DataFormatError(
                f"no user has at least {cls.MIN_EVENTS} events (all {dropped} have fewer); "
                "leave-one-out needs one training, one validation and one test event per user"
            )
        return cls(sequences, dropped)

    def input_range(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Start and end (exclusive) of each user's input events for ``split``."""
        starts = self.sequences.offsets[:-1]
        ends = self.sequences.offsets[1:]
        if split == "train":
            return starts, ends - 2
        if split == "valid":
            return starts, ends - 2
        if split == "test":
            return starts, ends - 1
        raise ValueError(f"unknown split {split!r}; expected train, valid or test")

    def targets(self, split: str) -> np.ndarray:
        """Dense item id of each user's held-out target for ``valid`` or ``test``."""
        ends = self.sequences.offsets[1:]
        if split == "valid":
            return self.sequences.item_ids[ends - 2]
        if split == "test":
            return self.sequences.item_ids[ends - 1]
        raise ValueError(f"split {split!r} has no single target; expected valid or test")
