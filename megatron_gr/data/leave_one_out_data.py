"""Reads the configured source into a leave-one-out split, and says what it read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_gr.data.duplicates import duplicate_events
from megatron_gr.data.errors import DataFormatError
from megatron_gr.data.movielens import read_movielens
from megatron_gr.data.prepared import load_prepared
from megatron_gr.data.sequences import LeaveOneOutSplit, UserSequences
from megatron_gr.data.summary import SequenceSummary
from megatron_gr.data.synthetic import generate
from megatron_gr.data.loader import training_users
from megatron_gr.data.sources import resolve_source
from megatron_gr.data.summary import DataReport

if TYPE_CHECKING:  # config imports data (the synthetic spec); no import cycle at run time
    from megatron_gr.config.data_config import DataConfig


@dataclass(frozen=True)
class TrainingData:
    split: LeaveOneOutSplit
    report: DataReport
    """What was read: ``report.line()`` is the line a run starts with."""


def load_training_data(data: "DataConfig") -> TrainingData:
    """The split of the configured data (source ``auto`` resolved from the path), repeated
    events removed when ``data.deduplicate``.

    Raises:
        DataFormatError: data no leave-one-out split can train on (no user with enough
            events), or a malformed source; FileNotFoundError: a missing path.
    """
    source = resolve_source(data.source, data.path)
    sequences = _read(source, data)
    repeated = duplicate_events(sequences)
    num_duplicates = int(repeated.sum())
    if num_duplicates and data.deduplicate:
        sequences = sequences.select_events(~repeated)
    where = f"{source} data {data.path}" if data.path is not None else f"{source} data"
    try:
        split = LeaveOneOutSplit.build(sequences)
    except DataFormatError as error:
        raise DataFormatError(f"{where}: {error}") from None
    _validate_trainable(split, where)
    report = DataReport(
        source=source,
        path=data.path,
        summary=SequenceSummary.of(sequences),
        num_dropped_users=split.num_dropped_users,
        min_events=LeaveOneOutSplit.MIN_EVENTS,
        num_duplicates=num_duplicates,
        duplicates_removed=data.deduplicate,
    )
    return TrainingData(split, report)


def _read(source: str, data: "DataConfig") -> UserSequences:
    if source == "synthetic":
        return UserSequences.from_events(generate(data.synthetic))
    if source == "movielens":
        return UserSequences.from_events(read_movielens(data.path))
    return load_prepared(data.path)


def _validate_trainable(split: LeaveOneOutSplit, where: str) -> None:
    if training_users(split).size == 0:
        longest = int(split.sequences.lengths.max())
        raise DataFormatError(
            f"{where}: no user has a training example: the longest sequence has {longest} events, "
            f"and leave-one-out holds out the last two of each user (validation and test), so a "
            "training example (an input and the next item) needs a user with 4 or more"
        )
