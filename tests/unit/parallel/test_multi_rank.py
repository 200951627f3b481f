"""Every parallel layout trains the single-rank model with the default config: TP=2 with
and without sequence parallelism, PP=2, DP=2 (distributed optimizer), TP=2 x PP=2 and
PP=2 x DP=2 reproduce the single-rank losses, gradient norms and every parameter's gradient
(fp32, jagged batches of very different lengths, gradient accumulation over micro-batches,
clipping active) over several steps, evaluate to the same metrics, and checkpoints saved
under one layout load under another with the same metrics and the same next losses. PP=2 x
DP=2 runs with the GPU settings (overlapped gradient reduction and weight all-gather,
several buckets).

Dropout is on (the defaults: embedding 0.2, hidden 0.2; masks keyed by sample, position
and feature) and micro-batches are cut by the default balancing (``auto``: by attention
cost with DP = 2, in stream order on one rank), so the layouts also cut the global batch
differently: the objective must not depend on it (negatives drawn per global batch).

Ranks are gloo processes started with torchrun: one launch of 4 ranks, then one of 2 ranks
(it loads a checkpoint the 4-rank launch saved). Single-rank references run in-process.
"""

from __future__ import annotations

import pytest

from tests.unit.parallel.layouts import (
    DEFAULT_DROPOUT,
    OVERLAP,
    LOSS_RTOL,
    STEPS,
    assert_same_training,
    assert_weights_close,
    config,
    launch,
    parity,
    resuming,
    saving,
    single_rank,
)
from tests.unit.parallel.scenarios import run_scenario

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def records(megatron_cpu, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi_rank")
    four = launch(tmp, 4, [
        saving("tp2_pp2_sp", config(tmp, "tp2_pp2_sp", tp=2, pp=2, sp=True, save=tmp / "ckpt_tp2pp2")),
        saving("pp2_dp2", config(tmp, "pp2_dp2", pp=2, save=tmp / "ckpt_pp2dp2", **OVERLAP)),
    ])
    two = launch(tmp, 2, [
        parity("tp2", config(tmp, "tp2", tp=2)),
        parity("tp2_sp", config(tmp, "tp2_sp", tp=2, sp=True)),
        parity("pp2", config(tmp, "pp2", pp=2)),
        parity("dp2", config(tmp, "dp2")),
        resuming("tp2pp2_to_pp2", config(tmp, "tp2pp2_to_pp2", pp=2, load=tmp / "ckpt_tp2pp2")),
    ])
    one_rank = {
        "single": run_scenario(single_rank("single", config(tmp, "single"))),
        "tp2pp2_to_single": run_scenario(resuming("tp2pp2_to_single", config(tmp, "tp2pp2_to_single", load=tmp / "ckpt_tp2pp2"))),
        "pp2dp2_to_single": run_scenario(resuming("pp2dp2_to_single", config(tmp, "pp2dp2_to_single", load=tmp / "ckpt_pp2dp2"))),
    }
    return {**four, **two, **one_rank}


LAYOUTS = {  # name: (tp, pp, dp); every layout uses the distributed optimizer
    "tp2": (2, 1, 1),
    "tp2_sp": (2, 1, 1),
    "pp2": (1, 2, 1),
    "dp2": (1, 1, 2),
    "tp2_pp2_sp": (2, 2, 1),
    "pp2_dp2": (1, 2, 2),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_reproduces_single_rank(records, name):
    run, single = records[name], records["single"]
    layout = run["layout"]
    assert (layout["tp"], layout["pp"], layout["dp"]) == LAYOUTS[name] and layout["distributed_optimizer"]
    assert layout["dropout"] == single["layout"]["dropout"] == DEFAULT_DROPOUT
    assert layout["micro_batch_balance"] == ("attention_cost" if layout["dp"] > 1 else "none")
    assert single["layout"]["micro_batch_balance"] == "none"
    if name == "pp2_dp2":
        assert layout["overlap_grad_reduce"] and layout["overlap_param_gather"] and layout["buckets"] > 2
    assert_same_training(run, single)  # STEPS steps, or STEPS + AFTER for the layouts that also saved
    assert run["valid"] == pytest.approx(single["valid"], rel=1e-6)


@pytest.mark.parametrize("saved, loaded", [
    ("tp2_pp2_sp", "tp2pp2_to_single"), ("tp2_pp2_sp", "tp2pp2_to_pp2"), ("pp2_dp2", "pp2dp2_to_single"),
])
def test_checkpoint_loads_under_another_layout(records, saved, loaded):
    """Model and optimizer state (distributed optimizer shards included) reshard: the loaded
    run evaluates to the saved run's metrics and continues with its losses."""
    before, after = records[saved], records[loaded]
    assert after["start_iteration"] == STEPS
    assert after["valid"] == pytest.approx(before["valid"], rel=1e-6)
    assert after["losses"] == pytest.approx(before["losses"][STEPS:], rel=LOSS_RTOL)
    assert_weights_close(after["final_params"], before["final_params"])
