"""The HSTU retrieval model with a dynamic (hash-table) item table trains the single-rank
model under TP=2 x DP=2 with sequence parallelism and the distributed optimizer: the rows
are sharded over the two data-parallel ranks and copied on the two tensor-parallel ranks
(losses, gradient norms, every dense gradient, dense weights, every row, metrics). Dropout
is off and micro-batches are cut by the default balancing, which cuts the global batch by
attention cost on two data-parallel ranks and in stream order on one: the objective must
not depend on the cut (losses and gradients within 1e-6 relative). A
checkpoint saved there (dense state in the dist checkpoint, rows in files written by
tensor-parallel rank 0) loads into one rank with the same weights, rows, metrics and next
losses. Pipeline parallelism with a dynamic table is rejected at config load
(tests/unit/config/test_parallel_config.py).
"""

from __future__ import annotations

import pytest

from tests.unit.parallel.layouts import (
    STEPS,
    assert_resumed,
    assert_rows_close,
    assert_same_training,
    launch,
    parity,
    resuming,
    saving,
    single_rank,
)
from tests.unit.parallel.layouts import config as plain_config
from tests.unit.parallel.scenarios import run_scenario

pytestmark = pytest.mark.slow

DYNAMIC = {"item": {"type": "dynamic", "dynamic": {"capacity": 256, "bucket_size": 16}}}


def config(tmp, name, **layout) -> dict:
    raw = plain_config(tmp, name, **layout)
    raw["embeddings"] = DYNAMIC
    raw["model"].update(hidden_dropout=0.0, embedding_dropout=0.0)
    return raw


@pytest.fixture(scope="module")
def records(megatron_cpu, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dynamic_multi_rank")
    ckpt = tmp / "ckpt_tp2_dp2"
    four = launch(tmp, 4, [
        saving("tp2_dp2_sp", config(tmp, "tp2_dp2_sp", tp=2, sp=True, save=ckpt)),
        parity("tp2_cp2_sp", config(tmp, "tp2_cp2_sp", tp=2, sp=True, context_parallel_size=2,
                                    context_parallel_split_threshold=8)),
    ])
    single = run_scenario(single_rank("single", config(tmp, "single")))
    loaded = run_scenario(resuming("loaded", config(tmp, "loaded", load=ckpt)))
    return {**four, "single": single, "loaded": loaded, "ckpt": ckpt}


def test_tp2_cp2_with_a_dynamic_table_reproduces_single_rank(records):
    """The rows are sharded over the two context-parallel ranks, each looking up its own
    tokens."""
    run, single = records["tp2_cp2_sp"], records["single"]
    assert tuple(run["layout"][k] for k in ("tp", "pp", "dp", "cp")) == (2, 1, 1, 2)
    assert_same_training(run, single)
    assert_rows_close(run["rows"], single["rows"])
    assert run["valid"] == pytest.approx(single["valid"], rel=1e-6)


def test_tp2_dp2_with_a_dynamic_table_reproduces_single_rank(records):
    run, single = records["tp2_dp2_sp"], records["single"]
    layout = run["layout"]
    assert (layout["tp"], layout["pp"], layout["dp"]) == (2, 1, 2) and layout["distributed_optimizer"]
    assert (layout["micro_batch_balance"], single["layout"]["micro_batch_balance"]) == ("attention_cost", "none")
    assert layout["dropout"] == {"hidden": 0.0, "embedding": 0.0}
    assert len(single["rows"]["item"]) > 30  # the run stores many rows
    assert len(run["losses"]) == len(single["losses"])  # the steps before and after the save
    assert_same_training(run, single)
    # The bar: this run drew other negatives per micro-batch cut and was 1.3% off.
    assert run["losses"] == pytest.approx(single["losses"], rel=1e-6)
    assert_rows_close(run["rows"], single["rows"])
    assert run["valid"] == pytest.approx(single["valid"], rel=1e-6)


def test_only_tensor_parallel_rank_0_writes_rows(records):
    files = sorted(p.name for p in (records["ckpt"] / f"iter_{STEPS:07d}" / "dynamic_embeddings" / "item").iterdir())
    assert files == ["manifest.json", "rank_00000.pt", "rank_00001.pt"]  # one file per data-parallel rank


def test_checkpoint_of_tp2_dp2_loads_into_one_rank(records):
    before, after = records["tp2_dp2_sp"], records["loaded"]
    assert_resumed(after, before)
    assert_rows_close(after["rows"], before["rows"])  # right after the load
    assert_rows_close(after["final_rows"], before["final_rows"])
