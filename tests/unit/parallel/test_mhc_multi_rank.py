"""The HSTU retrieval model with hyper-connections (n = 3) and mHC recompute trains the
single-rank model without recompute under TP=2 with sequence parallelism, DP=2, PP=2,
TP=2 x PP=2 with sequence parallelism and CP=2 (losses, gradient norms, every parameter's gradient
over several steps, metrics), and checkpoints saved under TP=2 + SP and TP=2 x PP=2 + SP
load under other layouts (one rank; PP=2) with the same metrics and next losses. Dropout
is on and micro-batches are cut by the default balancing, as in test_multi_rank.py.

Pipeline stages exchange the n streams, ``[T, 1, n C]`` (``[T / 2, 1, n C]`` under
sequence parallelism). Recompute blocks are cut per stage (2 layers each): PP=2 runs the
default block size (one layer: two blocks per stage), TP=2 x PP=2 blocks of two layers
(one per stage); the stage output, which the schedule frees once sent, is the output of
the stage's last block.
"""

from __future__ import annotations

import pytest

from tests.unit.parallel.layouts import (
    assert_resumed,
    assert_same_training,
    assert_weights_close,
    launch,
    parity,
    resuming,
    saving,
    single_rank,
)
from tests.unit.parallel.layouts import config as plain_config
from tests.unit.parallel.scenarios import run_scenario

pytestmark = pytest.mark.slow

# Adam divides each update by the root of the gradient's running square, so a gradient
# that is rounding noise becomes a full-size step in a noise direction that differs by
# layout. The first layer's H_res logits get exactly such gradients: its streams enter as
# equal copies, which any row-stochastic mixing leaves as they are. Their weights drift apart
# by up to 3e-6 over 3 steps (gradients still agree, see layouts.py); a wrong reduction would
# move the gradients themselves.
MHC_WEIGHT_ATOL = 5e-5

MHC = {"enable_hyper_connections": True, "num_residual_streams": 3, "mhc_init_gating_factor": 0.1}
RECOMPUTE = {"recompute_granularity": "selective", "recompute_modules": ["mhc"], "mhc_recompute_layer_num": 2}


def config(tmp, name, *, recompute: dict = RECOMPUTE, **layout) -> dict:
    raw = plain_config(tmp, name, **layout)
    raw["model"].update(MHC, **recompute)
    return raw


@pytest.fixture(scope="module")
def records(megatron_cpu, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mhc_multi_rank")
    tp2_sp, tp2_pp2 = tmp / "ckpt_tp2_sp", tmp / "ckpt_tp2_pp2"
    four = launch(tmp, 4, [saving("tp2_pp2_sp", config(tmp, "tp2_pp2_sp", tp=2, pp=2, sp=True, save=tp2_pp2))])
    default_blocks = {**RECOMPUTE, "mhc_recompute_layer_num": None}
    two = launch(tmp, 2, [
        saving("tp2_sp", config(tmp, "tp2_sp", tp=2, sp=True, save=tp2_sp)),
        parity("dp2", config(tmp, "dp2")),
        parity("pp2", config(tmp, "pp2", pp=2, recompute=default_blocks)),
        resuming("tp2pp2_to_pp2", config(tmp, "tp2pp2_to_pp2", pp=2, load=tp2_pp2)),
        parity("cp2", config(tmp, "cp2", context_parallel_size=2, context_parallel_split_threshold=8)),
    ])
    one_rank = {
        "single": run_scenario(single_rank("single", config(tmp, "single", recompute={}))),
        "tp2sp_to_single": run_scenario(resuming("tp2sp_to_single", config(tmp, "tp2sp_to_single", load=tp2_sp))),
        "tp2pp2_to_single": run_scenario(resuming("tp2pp2_to_single", config(tmp, "tp2pp2_to_single", load=tp2_pp2))),
    }
    return {**four, **two, **one_rank}


@pytest.mark.parametrize("name, layout", [
    ("tp2_sp", (2, 1, 1, 1)), ("dp2", (1, 1, 2, 1)), ("pp2", (1, 2, 1, 1)), ("tp2_pp2_sp", (2, 2, 1, 1)),
    ("cp2", (1, 1, 1, 2)),
])
def test_mhc_layout_reproduces_single_rank(records, name, layout):
    run, single = records[name], records["single"]
    assert tuple(run["layout"][k] for k in ("tp", "pp", "dp", "cp")) == layout
    assert_same_training(run, single, weights=assert_mhc_weights_close)
    assert run["valid"] == pytest.approx(single["valid"], rel=1e-6)


@pytest.mark.parametrize("saved, loaded", [
    ("tp2_sp", "tp2sp_to_single"), ("tp2_pp2_sp", "tp2pp2_to_single"), ("tp2_pp2_sp", "tp2pp2_to_pp2"),
])
def test_mhc_checkpoint_loads_under_another_layout(records, saved, loaded):
    assert_resumed(records[loaded], records[saved], weights=assert_mhc_weights_close)


def assert_mhc_weights_close(actual: dict, expected: dict) -> None:
    """mHC weights within MHC_WEIGHT_ATOL, all others as in layouts.py."""

    def part(values: dict, mhc: bool) -> dict:
        return {k: v for k, v in values.items() if k == "replica_max_diff" or ("hyper_connection" in k) == mhc}

    assert any("hyper_connection" in key for key in expected)
    assert_weights_close(part(actual, False), part(expected, False))
    mhc_actual, mhc_expected = part(actual, True), part(expected, True)
    assert mhc_actual["replica_max_diff"] == 0.0 and mhc_actual.keys() == mhc_expected.keys()
    for key, value in mhc_expected.items():
        if key != "replica_max_diff":
            error = float((mhc_actual[key] - value).abs().max())
            assert error <= MHC_WEIGHT_ATOL, f"mHC weight {key}: max difference {error:.2e} > {MHC_WEIGHT_ATOL:.0e}"
