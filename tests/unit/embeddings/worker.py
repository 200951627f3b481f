"""Multi-rank scenarios of the dynamic-embedding tests, run on every rank of a gloo group
(``run_ranks(N, "tests.unit.embeddings.worker:run", {"scenarios": [...], "workdir": ...})``).
Every rank can rebuild every rank's batches, so each checks its own results against a
single-process reference.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_gr.config.dynamic_embedding_config import DynamicTableConfig
from megatron_gr.config.embedding_config import EmbeddingTableConfig
from megatron_gr.embeddings.dynamic import DynamicEmbeddingCollection, dump, load_collection, save_collection
from megatron_gr.embeddings.dynamic.state import export_state
from tests.unit.embeddings.reference import DenseReference

DIM = 8
SEED = 5
# Raw ids far apart and of both signs; lookups draw from this pool with repeats.
POOL = torch.tensor(
    [2**40 + 7919 * k for k in range(150)] + [-(3**30) - k for k in range(100)] + list(range(1, 151)), dtype=torch.int64
)
PROBE = POOL[::3].contiguous()  # ids every rank reads back after a load


def table_config(**dynamic) -> EmbeddingTableConfig:
    settings = dict(capacity=4096, bucket_size=16, lr=0.05, seed=SEED)
    settings.update(dynamic)
    return EmbeddingTableConfig(dim=DIM, type="dynamic", init_std=0.1, dynamic=DynamicTableConfig(**settings))


def batch(step: int, rank: int, lookup: int, size: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (with repeats) and loss weights of one lookup of one rank."""
    generator = torch.Generator().manual_seed(10_000 * step + 100 * rank + lookup)
    ids = POOL[torch.randint(0, POOL.numel(), (size + 7 * rank,), generator=generator)]
    return ids, torch.randn(ids.numel(), DIM, generator=generator)


def train_steps(collection: DynamicEmbeddingCollection, steps: range, grad_scale: float = 1.0) -> None:
    rank = dist.get_rank()
    table = collection.tables["item"]
    for step in steps:
        for lookup in range(2):
            ids, weights = batch(step, rank, lookup)
            (collection.lookup("item", ids) * weights).sum().backward()
        table.scale_gradients(grad_scale)
        table.apply_step(dense_lr=0.0)


def scenario_optimizers(workdir: Path) -> None:
    """Lookups and updates of every optimizer equal the dense reference, on every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    for optimizer in ("sgd", "adagrad", "rowwise_adagrad", "adam"):
        collection = DynamicEmbeddingCollection(
            {"item": table_config(optimizer=optimizer, initial_accumulator=0.1)}, default_seed=0, device=torch.device("cpu")
        )
        reference = DenseReference(DIM, seed=SEED, init_std=0.1, optimizer=optimizer, lr=0.05, initial_accumulator=0.1)
        for step in range(3):
            grads: dict[int, torch.Tensor] = {}
            for lookup in range(2):
                for r in range(world):
                    ids, weights = batch(step, r, lookup)
                    expected = reference.lookup(ids)
                    if r == rank:
                        rows = collection.lookup("item", ids)
                        torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-6, msg=f"{optimizer} step {step}")
                        (rows * weights).sum().backward()
                    for i, w in zip(ids.tolist(), weights * 0.5):
                        grads[i] = grads[i] + w if i in grads else w.clone()
            table = collection.tables["item"]
            table.scale_gradients(0.5)
            table.apply_step(dense_lr=1.0)  # the table's own lr (0.05) wins
            reference.step(grads)
        state = export_state(table)
        for key, row in zip(state["rows"]["keys"].tolist(), state["rows"]["weights"]):
            torch.testing.assert_close(row, reference.rows[key].detach(), rtol=1e-5, atol=1e-6, msg=f"{optimizer} final row {key}")
        owned = torch.tensor([len(reference.rows)], dtype=torch.int64)
        stored = torch.tensor([state["rows"]["keys"].numel()])
        dist.all_reduce(stored)
        assert int(stored) == int(owned), f"{optimizer}: ranks store {int(stored)} rows, the reference has {int(owned)}"


def scenario_admission(workdir: Path) -> None:
    """Admission counts occurrences over all ranks: an id looked up once by every rank in a
    step reaches a threshold of ``world`` at once, and one of ``world + 1`` a step later."""
    world = dist.get_world_size()
    for threshold, admitted_after in ((world, 1), (world + 1, 2)):
        collection = DynamicEmbeddingCollection(
            {"item": table_config(optimizer="sgd", admission_threshold=threshold)}, default_seed=0, device=torch.device("cpu")
        )
        ids = torch.tensor([2**45 + 1], dtype=torch.int64)
        for step in range(2):
            collection.lookup("item", ids).sum().backward()
            collection.tables["item"].apply_step(dense_lr=0.0)
            stored = torch.tensor([collection.tables["item"].statistics()["occupancy"]])
            dist.all_reduce(stored)
            assert int(stored) == int(step + 1 >= admitted_after), (threshold, step, int(stored))


def _checkpointed(**extra) -> DynamicEmbeddingCollection:
    config = table_config(optimizer="adam", eviction="lfu", admission_threshold=2, **extra)
    return DynamicEmbeddingCollection({"item": config}, default_seed=0, device=torch.device("cpu"))


def scenario_save(workdir: Path) -> None:
    """Trains, saves, and records the truth: every rank's content and reads of PROBE."""
    rank = dist.get_rank()
    collection = _checkpointed()
    train_steps(collection, range(4))
    save_collection(collection, workdir / "ckpt")
    torch.save(export_state(collection.tables["item"]), workdir / f"truth_rank{rank}.pt")
    with torch.no_grad():
        collection.eval()
        torch.save(collection.lookup("item", PROBE), workdir / f"probe_rank{rank}.pt")


def scenario_load(workdir: Path) -> None:
    """Loads the save under this world size, records content and reads; then trains with
    incremental dumps and records the truth they must reproduce."""
    rank, world = dist.get_rank(), dist.get_world_size()
    collection = _checkpointed(ttl_steps=1, ttl_sweep_interval=1)
    load_collection(collection, workdir / "ckpt")
    torch.save(export_state(collection.tables["item"]), workdir / f"loaded{world}_rank{rank}.pt")
    collection.eval()
    with torch.no_grad():
        torch.testing.assert_close(collection.lookup("item", PROBE), torch.load(workdir / "probe_rank0.pt"), rtol=0, atol=0)
    collection.train()
    dump(collection, workdir / "dump0", incremental=False)
    train_steps(collection, range(4, 6))
    dump(collection, workdir / "dump1", incremental=True)
    train_steps(collection, range(6, 8))
    dump(collection, workdir / "dump2", incremental=True)
    torch.save(export_state(collection.tables["item"]), workdir / f"dumped_rank{rank}.pt")


def run(payload: dict) -> None:
    """The named scenarios in order, in one process group (one process start for several)."""
    for scenario in payload["scenarios"]:
        globals()[f"scenario_{scenario}"](Path(payload["workdir"]))
