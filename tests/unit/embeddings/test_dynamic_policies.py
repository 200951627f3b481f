"""Eviction (LRU, LFU, TTL), admission and counters of a dynamic table on crafted id
streams. The tables here have one bucket, so "the bucket's lowest score" is the table's."""

from __future__ import annotations

import pytest
import torch

from megatron_gr.config.dynamic_embedding_config import DynamicTableConfig
from megatron_gr.config.embedding_config import EmbeddingTableConfig
from megatron_gr.embeddings.dynamic import DynamicEmbeddingCollection
from megatron_gr.embeddings.dynamic.state import export_state
from megatron_gr.ops.pytorch.id_hash import init_scale, initial_values, row_salt

DIM = 4


def one_bucket(slots: int = 4, **dynamic) -> DynamicEmbeddingCollection:
    settings = dict(capacity=slots, bucket_size=slots, optimizer="sgd", lr=1.0, seed=3)
    settings.update(dynamic)
    config = EmbeddingTableConfig(dim=DIM, type="dynamic", init_std=0.1, dynamic=DynamicTableConfig(**settings))
    return DynamicEmbeddingCollection({"t": config}, default_seed=0, device=torch.device("cpu"))


def step(collection: DynamicEmbeddingCollection, ids: list[int], grad: float = 1.0) -> torch.Tensor:
    """One training step: look ``ids`` up, push ``grad`` into every row, update."""
    rows = collection.lookup("t", torch.tensor(ids, dtype=torch.int64))
    (rows.sum() * grad).backward()
    collection.tables["t"].apply_step(dense_lr=1.0)
    return rows.detach()


def stored(collection: DynamicEmbeddingCollection) -> set[int]:
    return set(export_state(collection.tables["t"])["rows"]["keys"].tolist())


def initial(ids: list[int]) -> torch.Tensor:
    n = len(ids)
    return initial_values(torch.tensor(ids), torch.full((n,), row_salt(3)), torch.full((n,), init_scale(0.1)), DIM)


def test_lru_evicts_the_row_seen_longest_ago():
    table = one_bucket(eviction="lru")
    step(table, [1, 2, 3, 4])  # step 0: all four stored
    step(table, [1, 2, 3])  # step 1: 4 is now the least recently seen
    step(table, [5])
    assert stored(table) == {1, 2, 3, 5}
    step(table, [1, 6])  # 2 and 3 (step 1) are older than 5 (step 2); 2 or 3 goes
    assert 6 in stored(table) and 1 in stored(table) and 5 in stored(table) and len(stored(table) & {2, 3}) == 1
    stats = table.tables["t"].statistics()
    assert stats["evictions"] == 2 and stats["occupancy"] == 4 and stats["load_factor"] == 1.0


def test_lfu_evicts_the_row_seen_least_often_then_the_oldest():
    table = one_bucket(eviction="lfu")
    step(table, [1, 1, 1, 2, 2, 3, 4])  # counts 3, 2, 1, 1
    step(table, [3])  # 3 -> 2: 4 is the only row seen once
    step(table, [5])
    assert stored(table) == {1, 2, 3, 5}
    step(table, [2, 2])  # counts: 1: 3, 2: 4, 3: 2, 5: 1
    step(table, [6])
    assert stored(table) == {1, 2, 3, 6}
    state = export_state(table.tables["t"])["rows"]
    freq = dict(zip(state["keys"].tolist(), state["freq"].tolist()))
    assert freq == {1: 3, 2: 4, 3: 2, 6: 1}


def test_rows_seen_in_the_current_step_are_never_evicted():
    table = one_bucket(eviction="lru")
    step(table, [1, 2, 3, 4])
    rows = step(table, [1, 2, 3, 4, 9])  # the bucket is full of rows of this step
    assert stored(table) == {1, 2, 3, 4}
    torch.testing.assert_close(rows[4], initial([9])[0])  # 9 reads its initial value ...
    stats = table.tables["t"].statistics()
    assert stats["rejected_full"] == 1 and stats["evictions"] == 0
    step(table, [9])  # ... and gets a row (and its update) once there is room
    assert 9 in stored(table)


def test_ttl_drops_rows_not_seen_for_n_steps():
    table = one_bucket(slots=8, ttl_steps=2, ttl_sweep_interval=1)
    step(table, [1, 2])  # step 0
    step(table, [2])  # step 1
    step(table, [2])  # step 2: after it, 1 has not been seen for 2 steps
    assert stored(table) == {2}
    assert table.tables["t"].statistics()["expired"] == 1
    rows = step(table, [1])  # 1 comes back as a new row: initial value, update forgotten
    torch.testing.assert_close(rows[0], initial([1])[0])


def test_ttl_sweeps_only_every_interval():
    table = one_bucket(slots=8, ttl_steps=1, ttl_sweep_interval=3)
    step(table, [1, 2])
    step(table, [2])
    assert stored(table) == {1, 2}  # expired, but not swept yet
    step(table, [2])  # step 3 completes: the sweep runs
    assert stored(table) == {2}


def test_a_step_skipped_on_the_device_drops_no_row_by_ttl():
    """The step decided on the device: a skipped step's due TTL sweep removes nothing (its
    step count is taken back once the host reads the verdict, after the next lookups), so
    rows and counters end as when the host skips the step."""

    def run(on_device: bool):
        collection = one_bucket(slots=8, ttl_steps=2, ttl_sweep_interval=1)
        table = collection.tables["t"]
        step(collection, [1, 2])
        step(collection, [2])
        (collection.lookup("t", torch.tensor([2])).sum()).backward()  # the step to skip
        if on_device:
            table.apply_step(dense_lr=1.0, skip=torch.ones(()))
            rows = step_rows(collection, [1])  # the next forward runs before the verdict is read
            table.undo_step()
        else:
            table.discard_step()
            rows = step_rows(collection, [1])
        table.apply_step(dense_lr=1.0)
        return rows, table.step, table.statistics()["expired"], stored(collection)

    on_host, on_device = run(False), run(True)
    torch.testing.assert_close(on_device[0], on_host[0], rtol=0, atol=0)  # row 1 kept its trained value
    assert not torch.equal(on_host[0][0], initial([1])[0])
    assert on_device[1:] == on_host[1:] == (3, 0, {1, 2})


def step_rows(collection: DynamicEmbeddingCollection, ids: list[int]) -> torch.Tensor:
    """A lookup and its backward (the update comes later)."""
    rows = collection.lookup("t", torch.tensor(ids, dtype=torch.int64))
    rows.sum().backward()
    return rows.detach()


def test_admission_after_threshold_occurrences():
    table = one_bucket(slots=8, admission_threshold=3)
    first = step(table, [7, 7, 8])  # 7 seen twice, 8 once: no rows
    assert stored(table) == set()
    torch.testing.assert_close(first, initial([7, 7, 8]))
    second = step(table, [7])  # 7 reaches 3 occurrences: admitted, still its initial value
    torch.testing.assert_close(second, initial([7]))
    assert stored(table) == {7}
    third = step(table, [7, 8])
    torch.testing.assert_close(third[0], initial([7])[0] - 1.0)  # one SGD step of gradient 1
    torch.testing.assert_close(third[1], initial([8])[0])  # 8 (2 occurrences) never moved
    state = export_state(table.tables["t"])
    assert state["rows"]["freq"].tolist() == [4]
    assert dict(zip(state["admission"]["keys"].tolist(), state["admission"]["freq"].tolist())) == {8: 2}
    stats = table.tables["t"].statistics()
    assert stats["rejected_admission"] == 2 + 0 + 1 and stats["inserts"] == 1


def test_full_table_without_eviction_is_a_clear_error():
    table = one_bucket(eviction="none")
    step(table, [1, 2, 3, 4])
    with pytest.raises(RuntimeError, match=r"full and eviction is disabled.*holds 4 of 4 rows.*dynamic.capacity"):
        step(table, [5])


def test_counters():
    table = one_bucket(slots=8)
    step(table, [1, 2, 2, 3])
    step(table, [2, 3, 4])
    stats = table.tables["t"].statistics()
    assert (stats["lookups"], stats["hits"], stats["misses"], stats["inserts"]) == (6, 2, 4, 4)
    assert stats["occupancy"] == 4 and stats["load_factor"] == 0.5


def test_reads_outside_training_store_nothing():
    table = one_bucket(slots=8)
    table.eval()
    with torch.no_grad():
        rows = table.lookup("t", torch.tensor([5, 6]))
    torch.testing.assert_close(rows, initial([5, 6]))
    assert stored(table) == set() and table.tables["t"].statistics()["lookups"] == 0


def test_a_replaced_row_starts_from_fresh_optimizer_state():
    """New rows flag their optimizer state fresh instead of writing it: a row created over an
    evicted row's leftover state by a lookup whose gradient never came still starts from the
    initial state at its first update, and an export shows the initial state."""
    tables = []
    for _ in range(3):
        collection = one_bucket(slots=2, optimizer="adam", lr=0.1, eviction="lru")
        tables.append(collection)
    ours, shown, clean = tables
    for collection in (ours, shown):
        for ids in ([5, 6], [7, 8]):  # fill, then replace, both slots: Adam state in memory
            step(collection, ids)
        collection.tables["t"].step = 5
        collection.lookup("t", torch.tensor([9, 10]))  # replaces 7 and 8; no backward
        collection.tables["t"].apply_step(dense_lr=1.0)
    assert ours.tables["t"]._states[0].abs().min() > 0  # the memory still holds 7's and 8's
    state = export_state(shown.tables["t"])
    assert sorted(state["rows"]["keys"].tolist()) == [9, 10]
    assert all(values.eq(0).all() for values in state["optimizer"].values())
    clean.tables["t"].step = 6
    assert torch.equal(step(ours, [9, 10, 9]), step(clean, [9, 10, 9]))
    after, expected = export_state(ours.tables["t"]), export_state(clean.tables["t"])
    assert torch.equal(after["rows"]["weights"], expected["rows"]["weights"])
    for name, values in expected["optimizer"].items():
        assert torch.equal(after["optimizer"][name], values)
