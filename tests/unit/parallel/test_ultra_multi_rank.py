"""ULTRA-HSTU trains the single-rank model on every layout: a two-channel model (channels
of different widths, one with semi-local attention, both with attention truncation — one
split inside the first pipeline stage, one at the stage boundary — and rematerialization)
under TP=2 with sequence parallelism (x DP=2), PP=2 (x DP=2) and TP=2 x PP=2 with sequence
parallelism reproduces the single-rank losses, gradient norms, every gradient and weight
over several steps and evaluates to the same metrics; with hyper-connections (n streams
truncated alike, exchanged between stages) PP=2 x DP=2 reproduces its single rank; a
checkpoint saved under TP=2 x PP=2 loads into one rank with the same metrics and next
losses. Dropout is on (inputs, STU layers, tower): keyed masks, which truncation carries
with the kept tokens, so every layout drops the same elements.

All parallel layouts run in one torchrun launch of 4 gloo ranks; the single-rank
references run in-process.
"""

from __future__ import annotations

import pytest

from tests.unit.parallel.layouts import (
    assert_rank_metrics_close,
    assert_resumed,
    assert_same_training,
    launch,
    parity,
    resuming,
    saving,
    single_rank,
)
from tests.unit.parallel.ranking_layouts import ultra_config as config
from tests.unit.parallel.scenarios import run_scenario

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def records(megatron_cpu, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ultra_multi_rank")
    ckpt = tmp / "ckpt_tp2pp2"
    four = launch(tmp, 4, [
        saving("tp2_pp2_sp", config(tmp, "tp2_pp2_sp", tp=2, pp=2, sp=True, save=ckpt)),
        parity("tp2_sp_dp2", config(tmp, "tp2_sp_dp2", tp=2, sp=True)),
        parity("pp2_dp2", config(tmp, "pp2_dp2", pp=2)),
        parity("pp2_dp2_mhc", config(tmp, "pp2_dp2_mhc", pp=2, mhc=True)),
    ])
    single = {
        "single": run_scenario(single_rank("single", config(tmp, "single"))),
        "single_mhc": run_scenario(parity("single_mhc", config(tmp, "single_mhc", mhc=True))),
        "tp2pp2_to_single": run_scenario(resuming("loaded", config(tmp, "loaded", load=ckpt))),
    }
    return {**four, **single}


LAYOUTS = {  # name: ((tp, pp, dp), single-rank reference)
    "tp2_pp2_sp": ((2, 2, 1), "single"),
    "tp2_sp_dp2": ((2, 1, 2), "single"),
    "pp2_dp2": ((1, 2, 2), "single"),
    "pp2_dp2_mhc": ((1, 2, 2), "single_mhc"),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_ultra_layout_reproduces_single_rank(records, name):
    shape, reference = LAYOUTS[name]
    run, single = records[name], records[reference]
    assert tuple(run["layout"][k] for k in ("tp", "pp", "dp")) == shape
    assert run["layout"]["dropout"] == {"hidden": 0.2, "embedding": 0.2}
    assert_same_training(run, single)  # STEPS, or STEPS + AFTER for the layout that also saved
    assert any(key.startswith("channels.click.") for key in single["params"])
    assert_rank_metrics_close(run["valid"], single["valid"])
    assert 0.0 < single["valid"]["auc"] < 1.0


def test_ultra_checkpoint_of_tp2_pp2_loads_into_one_rank(records):
    assert_resumed(records["tp2pp2_to_single"], records["tp2_pp2_sp"], metrics=assert_rank_metrics_close)
