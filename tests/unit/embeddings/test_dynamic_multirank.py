"""Dynamic tables on 1, 2 and 4 gloo ranks: lookups and optimizer steps equal a dense
single-process reference; a save under 4 ranks loads under 2 and 1 with identical rows,
scores and optimizer state; incremental dumps reproduce the table.

Process starts are the cost here, so one start per world size runs several scenarios.
"""

from __future__ import annotations

import pytest
import torch

from megatron_gr.embeddings.dynamic import load_dumps
from megatron_gr.embeddings.dynamic.checkpoint import load_collection
from megatron_gr.embeddings.dynamic.state import export_state
from tests.support.multirank import run_ranks
from tests.unit.embeddings import worker


def _merged(states: list[dict]) -> dict:
    """Content of a table over all ranks, keyed by (id, tag): every row's fields."""
    content = {"step": {s["step"] for s in states}, "rows": {}, "admission": {}}
    for state in states:
        rows = state["rows"]
        for j, key in enumerate(zip(rows["keys"].tolist(), rows["tags"].tolist())):
            assert key not in content["rows"], f"{key} stored twice"
            fields = {name: rows[name][j] for name in rows if name not in ("keys", "tags")}
            fields.update({f"optimizer.{name}": v[j] for name, v in state.get("optimizer", {}).items()})
            content["rows"][key] = fields
        waiting = state.get("admission")
        if waiting is not None:
            for j, key in enumerate(zip(waiting["keys"].tolist(), waiting["tags"].tolist())):
                content["admission"][key] = (int(waiting["last_seen"][j]), int(waiting["freq"][j]))
    return content


def _assert_same_content(actual: dict, expected: dict) -> None:
    assert actual["step"] == expected["step"]
    assert actual["rows"].keys() == expected["rows"].keys()
    for key, fields in expected["rows"].items():
        for name, value in fields.items():
            assert torch.equal(actual["rows"][key][name], value), f"row {key} field {name} differs"
    assert actual["admission"] == expected["admission"]


def _load(tmp_path, pattern: str, world: int) -> dict:
    return _merged([torch.load(tmp_path / pattern.format(rank=r)) for r in range(world)])


@pytest.fixture(scope="module")
def single_process_group():
    """A one-rank gloo group (the session's megatron group when it exists)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_optimizers_match_dense_reference_on_one_rank(single_process_group, tmp_path):
    worker.scenario_optimizers(tmp_path)
    worker.scenario_admission(tmp_path)


@pytest.mark.slow
def test_four_and_two_ranks(tmp_path, single_process_group):
    # 4 ranks: every optimizer against the reference, admission over ranks, then a save
    # with the truth recorded.
    run_ranks(4, "tests.unit.embeddings.worker:run", {"scenarios": ["optimizers", "admission", "save"], "workdir": tmp_path},
              workdir=tmp_path)
    truth = _load(tmp_path, "truth_rank{rank}.pt", 4)
    assert len(truth["rows"]) > 100 and truth["admission"], "the scenario should store rows and count waiting ids"
    assert {len(f) for f in truth["rows"].values()} == {5}  # last_seen, freq, weights, exp_avg, exp_avg_sq

    # 2 ranks: the optimizers again; the 4-rank save loaded; incremental dumps taken.
    run_ranks(2, "tests.unit.embeddings.worker:run", {"scenarios": ["optimizers", "admission", "load"], "workdir": tmp_path},
              workdir=tmp_path)
    _assert_same_content(_load(tmp_path, "loaded2_rank{rank}.pt", 2), truth)

    # 1 rank (this process): the same save, the same reads.
    collection = worker._checkpointed()
    load_collection(collection, tmp_path / "ckpt")
    _assert_same_content(_merged([export_state(collection.tables["item"])]), truth)
    collection.eval()
    with torch.no_grad():
        assert torch.equal(collection.lookup("item", worker.PROBE), torch.load(tmp_path / "probe_rank0.pt"))

    # The 2-rank dumps (rows dropped by TTL in between) reproduce that table here.
    dumped = _load(tmp_path, "dumped_rank{rank}.pt", 2)
    collection = worker._checkpointed(ttl_steps=1, ttl_sweep_interval=1)
    load_dumps(collection, [tmp_path / "dump0", tmp_path / "dump1", tmp_path / "dump2"])
    _assert_same_content(_merged([export_state(collection.tables["item"])]), dumped)
