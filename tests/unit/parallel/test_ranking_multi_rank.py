"""DLRM-HSTU trains the single-rank model on every layout, dropout on (inputs, STU layers
and tower: keyed masks): TP=2 with sequence parallelism (x DP=2), PP=2 (x DP=2), DP=4,
TP=2 x PP=2 with sequence parallelism, context parallelism (CP=2 x DP=2; sequences longer
than 8 tokens split, so a request's candidates may lie on both ranks), all with plain
tables, and dynamic (hash) tables under TP=2 x DP=2 and TP=2 x CP=2 with sequence
parallelism reproduce the single-rank losses, gradient norms, every gradient and weight
(dynamic rows too) over several steps, and evaluate to the same metrics. A checkpoint saved
under TP=2 x PP=2 loads into one rank with the same metrics and continues with the same
losses.

Everything parallel runs in one torchrun launch of 4 gloo ranks; the single-rank
references run in-process. Dynamic tables under pipeline parallelism are a config error
(tests/unit/config/test_ranking_config.py).
"""

from __future__ import annotations

import pytest

from tests.unit.parallel.layouts import (
    assert_rank_metrics_close,
    assert_resumed,
    assert_rows_close,
    assert_same_training,
    launch,
    parity,
    resuming,
    saving,
    single_rank,
)
from tests.unit.parallel.ranking_layouts import CP, DYNAMIC
from tests.unit.parallel.ranking_layouts import dlrm_config as config
from tests.unit.parallel.scenarios import run_scenario

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def records(megatron_cpu, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranking_multi_rank")
    ckpt = tmp / "ckpt_tp2pp2"
    four = launch(tmp, 4, [
        saving("tp2_pp2_sp", config(tmp, "tp2_pp2_sp", tp=2, pp=2, sp=True, save=ckpt)),
        parity("tp2_sp_dp2", config(tmp, "tp2_sp_dp2", tp=2, sp=True)),
        parity("pp2_dp2", config(tmp, "pp2_dp2", pp=2)),
        parity("dp4", config(tmp, "dp4")),
        parity("cp2_dp2", config(tmp, "cp2_dp2", **CP)),
        parity("tp2_sp_dp2_dynamic", config(tmp, "tp2_sp_dp2_dynamic", tp=2, sp=True, tables=DYNAMIC)),
        parity("tp2_cp2_sp_dynamic", config(tmp, "tp2_cp2_sp_dynamic", tp=2, sp=True, tables=DYNAMIC, **CP)),
    ])
    single = {
        "single": run_scenario(single_rank("single", config(tmp, "single"))),
        "single_dynamic": run_scenario(parity("single_dynamic", config(tmp, "single_dynamic", tables=DYNAMIC))),
        "tp2pp2_to_single": run_scenario(resuming("loaded", config(tmp, "loaded", load=ckpt))),
    }
    return {**four, **single}


LAYOUTS = {  # name: ((tp, pp, dp, cp), single-rank reference)
    "tp2_pp2_sp": ((2, 2, 1, 1), "single"),
    "tp2_sp_dp2": ((2, 1, 2, 1), "single"),
    "pp2_dp2": ((1, 2, 2, 1), "single"),
    "dp4": ((1, 1, 4, 1), "single"),
    "cp2_dp2": ((1, 1, 2, 2), "single"),
    "tp2_sp_dp2_dynamic": ((2, 1, 2, 1), "single_dynamic"),
    "tp2_cp2_sp_dynamic": ((2, 1, 1, 2), "single_dynamic"),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_ranking_layout_reproduces_single_rank(records, name):
    shape, reference = LAYOUTS[name]
    run, single = records[name], records[reference]
    assert tuple(run["layout"][k] for k in ("tp", "pp", "dp", "cp")) == shape
    assert run["layout"]["dropout"] == {"hidden": 0.2, "embedding": 0.2}
    assert_same_training(run, single)  # STEPS, or STEPS + AFTER for the layout that also saved
    if name.endswith("dynamic"):
        assert len(single["rows"]["item"]) > 20
        assert_rows_close(run["rows"], single["rows"])
    assert_rank_metrics_close(run["valid"], single["valid"])
    assert 0.0 < single["valid"]["auc"] < 1.0 and "click/gauc" in single["valid"]


def test_ranking_checkpoint_of_tp2_pp2_loads_into_one_rank(records):
    assert_resumed(records["tp2pp2_to_single"], records["tp2_pp2_sp"], metrics=assert_rank_metrics_close)
