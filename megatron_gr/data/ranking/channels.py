"""Behaviour channels of ranking data for ULTRA-HSTU's mixture of transducers: each channel
reads one history (an event store) of the samples, all channels share the contextual
features and the candidates.

A source's base history is the store ``uih``. The synthetic source also offers ``click``:
each sample's clicked events only (a consumption channel beside the impression history),
with the columns prefixed ``click_``. For samples whose base histories are
``[a0 a1 a2 | b0 b1 b2 b3]`` with clicks on a1, b0, b3::

    uih     history_begin/end = [0, 3] / [3, 7]    events = [a0 a1 a2 b0 b1 b2 b3]
    click   history_begin/end = [0, 1] / [1, 3]    events = [a1 b0 b3]

Every channel is indexed for the run with the same table numbering (a table read by
several channels numbers the union of their ids), so one table serves them all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from megatron_gr.data.item_space import ItemSpace
from megatron_gr.data.ranking.columns import MOVIELENS_COLUMNS, SYNTHETIC_COLUMNS
from megatron_gr.data.ranking.indexed import IndexedSamples, TaskLabel, index_samples
from megatron_gr.data.ranking.samples import RankingSamples

_HISTORY_GROUPS = ("uih", "uih_action", "uih_watchtime", "uih_timestamp")
CLICK_BIT = 1  # the synthetic generator's click bit (``synthetic.CLICK``)


def _base_columns(columns: dict) -> tuple[str, ...]:
    return tuple(c for group in _HISTORY_GROUPS for c in columns[group])


SOURCE_EVENT_STORES = {
    "synthetic": {
        "uih": _base_columns(SYNTHETIC_COLUMNS),
        "click": tuple("click_" + c for c in _base_columns(SYNTHETIC_COLUMNS)),
    },
    "movielens": {"uih": _base_columns(MOVIELENS_COLUMNS)},
}
"""Source -> store -> the event columns it holds (for the config checks)."""


@dataclass
class EventStore:
    history_begin: np.ndarray
    """``[S]`` int64: first event of each sample's history."""
    history_end: np.ndarray
    """``[S]`` int64: one past its last event."""
    events: dict[str, np.ndarray]
    """Column -> ``[E]`` values."""


def event_stores(samples: RankingSamples, source: str) -> dict[str, EventStore]:
    """The histories ``samples`` of ``source`` offer, by store name."""
    stores = {"uih": EventStore(samples.history_begin, samples.history_end, samples.events)}
    if source == "synthetic":
        clicked = (samples.events["action"] & CLICK_BIT) != 0
        stores["click"] = filtered_store(stores["uih"], clicked, prefix="click_")
    return stores


def filtered_store(store: EventStore, keep: np.ndarray, *, prefix: str) -> EventStore:
    """The events of ``store`` where ``keep`` holds, columns renamed ``prefix + column``;
    each sample's history keeps its kept events (histories are ranges of the events)."""
    kept_before = np.concatenate([[0], np.cumsum(keep)]).astype(np.int64)  # [E + 1]
    return EventStore(
        history_begin=kept_before[store.history_begin],
        history_end=kept_before[store.history_end],
        events={prefix + name: values[keep] for name, values in store.events.items()},
    )


def store_of(features, stores: dict[str, EventStore]) -> EventStore:
    """The store holding every history column of ``features`` (a FeatureGroupsConfig);
    the config checks guarantee one exists for built-in sources."""
    columns = list(features.uih) + [c for c in (features.uih_action, features.uih_watchtime, features.uih_timestamp) if c]
    for store in stores.values():
        if all(c in store.events for c in columns):
            return store
    raise ValueError(f"no history of the data holds the columns {', '.join(columns)}")


def index_channels(
    samples: RankingSamples,
    stores: dict[str, EventStore],
    channel_features: dict[str, object],
    *,
    tasks: list[TaskLabel],
    raw_keyed_tables: set[str],
    source: str,
) -> dict[str, IndexedSamples]:
    """Each channel's samples (its history, the shared candidates and contextual features)
    indexed with one numbering per table across channels."""
    indexed = {}
    for name, features in channel_features.items():
        store = store_of(features, stores)
        view = dataclasses.replace(
            samples, history_begin=store.history_begin, history_end=store.history_end, events=store.events
        )
        indexed[name] = index_samples(view, features=features, tasks=tasks, raw_keyed_tables=raw_keyed_tables, source=source)
    return _shared_numbering(indexed)


def _shared_numbering(indexed: dict[str, IndexedSamples]) -> dict[str, IndexedSamples]:
    """Renumbers every channel's ids in the union vocabulary of each table."""
    vocabularies: dict[str, list[np.ndarray]] = {}
    for data in indexed.values():
        for table, space in data.tables.items():
            vocabularies.setdefault(table, []).append(space.vocab[1:])
    union = {table: np.unique(np.concatenate(parts)) for table, parts in vocabularies.items()}
    out = {}
    for name, data in indexed.items():
        spaces = {
            table: ItemSpace(vocab=np.concatenate([np.array([-1], dtype=np.int64), union[table]]), raw_keys=space.raw_keys)
            for table, space in data.tables.items()
        }

        def renumber(dense: np.ndarray, tables: tuple[str, ...]) -> np.ndarray:
            out_ids = np.empty_like(dense)
            for i, table in enumerate(tables):
                raw = data.tables[table].vocab[dense[:, i]]
                out_ids[:, i] = np.searchsorted(union[table], raw) + 1
            return out_ids

        out[name] = dataclasses.replace(
            data,
            tables=spaces,
            contextual_ids=renumber(data.contextual_ids, data.contextual_tables),
            history_ids=renumber(data.history_ids, data.history_tables),
            candidate_ids=renumber(data.candidate_ids, data.candidate_tables),
        )
    return out
