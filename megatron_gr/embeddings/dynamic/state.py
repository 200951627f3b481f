"""A physical table's content as plain tensors, and back under any number of ranks.

A rank's state is compact: only stored rows, each with its id, tag, scores, vector and
optimizer state. Restoring keeps the rows this rank owns under the current routing and
inserts them afresh, so a state saved by any number of ranks restores under any other.
"""

from __future__ import annotations

from typing import Iterable

import torch

from megatron_gr.embeddings.dynamic.table import PhysicalTable
from megatron_gr.ops import hash_table
from megatron_gr.ops.pytorch.hash_probe import INSERTED
from megatron_gr.ops.pytorch.id_hash import owner_ranks

# A step beyond any training step: rows inserted while loading are never evicted by the load.
_LOADING_STEP = 2**62


def _index_state(index, slots: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "keys": index.keys[slots].cpu(),
        "tags": index.tags[slots].cpu(),
        "last_seen": index.last_seen[slots].cpu(),
        "freq": index.freq[slots].cpu(),
    }


def export_state(table: PhysicalTable, *, with_optimizer: bool = True, changed_only: bool = False) -> dict:
    """This rank's rows (all, or those changed since the last dump) as CPU tensors."""
    stored = table.index.occupied()
    if changed_only:
        stored &= table.index.changed.bool()
    slots = torch.nonzero(stored).squeeze(1)
    state = {"step": table.step, "rows": _index_state(table.index, slots)}
    state["rows"]["weights"] = table.weights[slots].cpu()
    if with_optimizer:
        state["optimizer"] = {name: values[slots].cpu() for name, values in zip(table.state_names, table.states)}
    if table.admission is not None:
        state["admission"] = _index_state(table.admission, table.admission.stored_slots())
    return state


def _owned(table: PhysicalTable, keys: torch.Tensor, tags: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    hashes = hash_table.routing_keys(keys, tags if table.coalesced else None)
    return owner_ranks(hashes, world) == rank


def _reset(index) -> None:
    index.last_seen.fill_(-1)
    index.freq.zero_()
    index.changed.zero_()


def _insert(table: PhysicalTable, index, rows: dict[str, torch.Tensor], what: str) -> torch.Tensor:
    """Places stored rows (ids, tags, scores) into an empty index; returns their slots."""
    device = index.keys.device
    keys, tags = rows["keys"].to(device), rows["tags"].to(device)
    hashes = hash_table.routing_keys(keys, tags if table.coalesced else None)
    order = torch.argsort(hashes, stable=True)
    keys, tags, hashes = keys[order], tags[order], hashes[order]
    freq = rows["freq"].to(device)[order]
    result = index.probe(keys, tags, hashes, freq, torch.ones_like(keys, dtype=torch.bool), step=_LOADING_STEP, update_scores=False)
    lost = int((result.status != INSERTED).sum())
    if lost:
        raise ValueError(
            f"dynamic table '{table.name}': {lost} of {keys.numel()} {what} do not fit this rank's "
            f"{index.capacity} slots (their buckets are full): raise dynamic.capacity or load with more ranks"
        )
    slots = torch.empty_like(result.slots)
    slots[order] = result.slots
    index.last_seen[slots] = rows["last_seen"].to(device)
    index.changed[slots] = 0
    return slots


def restore_state(table: PhysicalTable, parts: Iterable[dict], *, rank: int, world: int) -> None:
    """Replaces the table's content with the rows of ``parts`` (states of the saving ranks,
    in any number, read one at a time) that ``rank`` of ``world`` owns. Optimizer state
    absent from ``parts`` starts fresh."""
    steps, rows, optimizer, waiting = set(), [], [], []
    for part in parts:  # keep only this rank's rows of each part before reading the next
        steps.add(part["step"])
        mine = _owned(table, part["rows"]["keys"], part["rows"]["tags"], rank, world)
        rows.append({name: values[mine] for name, values in part["rows"].items()})
        saved = part.get("optimizer") or {}
        optimizer.append({name: saved[name][mine] for name in table.state_names if name in saved})
        if "admission" in part:
            counted = part["admission"]
            keep = _owned(table, counted["keys"], counted["tags"], rank, world)
            waiting.append({name: values[keep] for name, values in counted.items()})
    if len(steps) != 1:
        raise ValueError(f"dynamic table '{table.name}': the saved shards disagree on the step count: {sorted(steps)}")
    _reset(table.index)
    table.discard_step()
    rows = _concat(rows)
    slots = _insert(table, table.index, rows, "saved rows")
    table.weights[slots] = rows["weights"].to(table.weights.device)
    for name, values, initial in zip(table.state_names, table.states, table.state_init):
        if all(name in part for part in optimizer):
            values[slots] = torch.cat([part[name] for part in optimizer]).to(values.device)
        else:
            values[slots] = initial
    if table.admission is not None:
        _reset(table.admission)
        if waiting:
            _insert(table, table.admission, _concat(waiting), "admission counters")
    table.step = steps.pop()


def _concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
