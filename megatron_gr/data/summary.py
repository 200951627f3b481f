"""Short descriptions of a set of user sequences, for tools and logs: counts, lengths and
time span (:class:`SequenceSummary`), and the line a training run starts with
(:class:`DataReport`)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_gr.data.sequences import UserSequences


@dataclass(frozen=True)
class SequenceSummary:
    """Counts, sequence lengths and time span of a :class:`UserSequences`."""

    num_users: int
    num_items: int
    num_events: int
    min_length: int
    median_length: float
    max_length: int
    first_timestamp: int
    """Earliest event, Unix seconds."""
    last_timestamp: int
    """Latest event, Unix seconds."""

    @classmethod
    def of(cls, sequences: UserSequences) -> "SequenceSummary":
        if sequences.num_events == 0:
            raise ValueError("cannot summarize sequences without events")
        lengths = sequences.lengths
        timestamps = sequences.timestamps
        return cls(
            num_users=sequences.num_users,
            num_items=sequences.num_items,
            num_events=sequences.num_events,
            min_length=int(lengths.min()),
            median_length=float(np.median(lengths)),
            max_length=int(lengths.max()),
            first_timestamp=int(timestamps.min()),
            last_timestamp=int(timestamps.max()),
        )

    def lines(self) -> list[str]:
        days = (self.last_timestamp - self.first_timestamp) / 86_400
        return [
            f"users {self.num_users:,}, items {self.num_items:,}, events {self.num_events:,}",
            f"sequence length min {self.min_length:,}, median {self.median_length:,g}, "
            f"max {self.max_length:,}",
            f"time span {_date(self.first_timestamp)} to {_date(self.last_timestamp)} "
            f"({days:,.1f} days)",
        ]


@dataclass(frozen=True)
class DataReport:
    """What a run trains on, as one line::

        data: movielens ../shared/data/ml-100k: 943 users, 1682 items, 100000 events (0 users with < 3 events dropped)

    Users and events are those read (without the removed duplicates), before the split drops
    the users with too few events; items are the whole corpus that evaluation ranks.
    """

    source: str
    """``synthetic``, ``movielens`` or ``prepared`` (never ``auto``: the resolved source)."""
    path: Optional[str]
    """The data path as configured; None for generated data."""
    summary: SequenceSummary
    """Counts of the sequences read, duplicates removed when ``duplicates_removed``."""
    num_dropped_users: int
    """Users the leave-one-out split drops for having fewer than ``min_events`` events."""
    min_events: int
    num_duplicates: int
    """Events that repeat an earlier (user, item, timestamp) of the data."""
    duplicates_removed: bool
    """Whether those repeats were removed (``data.deduplicate``) or kept."""

    def line(self) -> str:
        where = f"{self.source} {self.path}" if self.path is not None else self.source
        s = self.summary
        notes = [f"{self.num_dropped_users} users with < {self.min_events} events dropped"]
        if self.num_duplicates and self.duplicates_removed:
            notes.append(f"{self.num_duplicates} duplicate (user, item, timestamp) events removed")
        elif self.num_duplicates:
            notes.append(
                f"{self.num_duplicates} duplicate (user, item, timestamp) events kept, which can put "
                "held-out targets into the input: data.deduplicate=true removes them"
            )
        return (
            f"data: {where}: {s.num_users} users, {s.num_items} items, {s.num_events} events "
            f"({'; '.join(notes)})"
        )


def _date(timestamp: int) -> str:
    try:
        moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    except (OverflowError, ValueError, OSError):
        return f"{timestamp} s"  # beyond the calendar datetime supports
    return moment.strftime("%Y-%m-%d")
