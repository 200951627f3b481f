"""Ranking samples indexed for one run: every embedded feature's raw ids numbered in its
table's id space, the per-task labels, and the planted probabilities where known.

A table's vocabulary is the union of the raw values of every feature looked up in it (a
history item id and a candidate item id share the item table's numbering). Dense ids are
1..n (0 is padding); :class:`ItemSpace` turns them into what the table is keyed by (dense
ids, or raw ids for a dynamic table).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_gr.data.errors import DataFormatError
from megatron_gr.data.item_space import ItemSpace
from megatron_gr.data.ranking.samples import RankingSamples


@dataclass(frozen=True)
class TaskLabel:
    """What a task reads: a label column, and for binary tasks the positive bits."""

    name: str
    label: str
    bitmask: int | None  # None: regression on the label's value


@dataclass
class IndexedSamples:
    samples: RankingSamples
    tables: dict[str, ItemSpace]
    """Table name -> its id space."""
    contextual_tables: tuple[str, ...]
    history_tables: tuple[str, ...]
    candidate_tables: tuple[str, ...]
    contextual_ids: np.ndarray
    """``[S, contextual features]`` dense ids."""
    history_ids: np.ndarray
    """``[E, uih features]`` dense ids of every event."""
    candidate_ids: np.ndarray
    """``[N, candidate features]`` dense ids."""
    history_actions: np.ndarray
    """``[E]`` int64 action bitmask (zeros without ``uih_action``)."""
    history_watchtimes: np.ndarray
    """``[E]`` float32 watch time (zeros without ``uih_watchtime``)."""
    history_timestamps: np.ndarray
    """``[E]`` int64."""
    candidate_timestamps: np.ndarray
    """``[N]`` int64."""
    query_times: np.ndarray
    """``[S]`` int64: a sample's latest candidate time; time gaps are measured to it."""
    labels: np.ndarray
    """``[N, tasks]`` float32: 0/1 for binary tasks, the value for regressions."""
    oracle: np.ndarray
    """``[N, tasks]`` float64 planted probability of a positive; NaN where unknown."""

    @property
    def num_contextual(self) -> int:
        return self.contextual_ids.shape[1]


def index_samples(
    samples: RankingSamples,
    *,
    features,
    tasks: list[TaskLabel],
    raw_keyed_tables: set[str],
    source: str,
) -> IndexedSamples:
    """Numbers ``samples`` for the feature groups ``features`` (a FeatureGroupsConfig);
    DataFormatError on labels that do not fit their task."""
    groups = {"contextual": samples.contextual, "uih": samples.events, "candidate": samples.candidates}
    per_table: dict[str, list[np.ndarray]] = {}
    for group, mapping in features.embedded().items():
        for column, table in mapping.items():
            per_table.setdefault(table, []).append(groups[group][column])
    tables, vocabularies = {}, {}
    for table, columns in per_table.items():
        vocabulary = np.unique(np.concatenate(columns))
        vocabularies[table] = vocabulary
        tables[table] = ItemSpace(
            vocab=np.concatenate([np.array([-1], dtype=np.int64), vocabulary]), raw_keys=table in raw_keyed_tables
        )

    def dense(group: str) -> np.ndarray:
        mapping = features.embedded()[group]
        length = samples.num_samples if group == "contextual" else len(next(iter(groups[group].values()), []))
        out = np.zeros((length, len(mapping)), dtype=np.int64)
        for i, (column, table) in enumerate(mapping.items()):
            out[:, i] = np.searchsorted(vocabularies[table], groups[group][column]) + 1
        return out

    events, candidates = samples.events, samples.candidates
    num_events = len(events[features.uih_timestamp])
    stamps = candidates[features.candidate_timestamp].astype(np.int64)
    return IndexedSamples(
        samples=samples,
        tables=tables,
        contextual_tables=tuple(features.contextual.values()),
        history_tables=tuple(features.uih.values()),
        candidate_tables=tuple(features.candidate.values()),
        contextual_ids=dense("contextual"),
        history_ids=dense("uih"),
        candidate_ids=dense("candidate"),
        history_actions=_actions(events, features.uih_action, num_events, source),
        history_watchtimes=(
            events[features.uih_watchtime].astype(np.float32)
            if features.uih_watchtime is not None else np.zeros(num_events, np.float32)
        ),
        history_timestamps=events[features.uih_timestamp].astype(np.int64),
        candidate_timestamps=stamps,
        query_times=np.maximum.reduceat(stamps, samples.candidate_offsets[:-1]),
        labels=_labels(candidates, tasks, source),
        oracle=np.stack(
            [samples.oracle.get(f"{task.label}&{task.bitmask}", np.full(stamps.size, np.nan)) for task in tasks], axis=1
        ).astype(np.float64),
    )


def _actions(events: dict, column, num_events: int, source: str) -> np.ndarray:
    if column is None:
        return np.zeros(num_events, dtype=np.int64)
    actions = np.asarray(events[column])
    if actions.size and (not np.issubdtype(actions.dtype, np.integer) or int(actions.min()) < 0):
        raise DataFormatError(f"{source}: the action column {column} must hold non-negative integer bitmasks")
    return actions.astype(np.int64)


def _labels(candidates: dict, tasks: list[TaskLabel], source: str) -> np.ndarray:
    columns = []
    for task in tasks:
        values = np.asarray(candidates[task.label], dtype=np.float64)
        if not np.isfinite(values).all():
            bad = values[~np.isfinite(values)][0]
            raise DataFormatError(f"{source}: label column {task.label} (task {task.name}) holds {bad}; expected finite values")
        if task.bitmask is None:
            columns.append(values)
            continue
        if (values < 0).any() or (values != np.floor(values)).any() or (values >= 2.0**53).any():
            bad = values[(values < 0) | (values != np.floor(values)) | (values >= 2.0**53)][0]
            raise DataFormatError(
                f"{source}: label column {task.label} (binary task {task.name}) holds {bad}; expected an action "
                "bitmask (a non-negative integer)"
            )
        columns.append((values.astype(np.int64) & task.bitmask) != 0)
    return np.stack(columns, axis=1).astype(np.float32)
