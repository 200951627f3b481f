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
    LOSS_RTOL,
    STEPS,
    assert_same_training,
    assert_weights_close,
    launch,
    parity,
    resuming,
    saving,
    single_rank,
)
from tests.unit.parallel.layouts import config as base_config
from tests.unit.parallel.scenarios import run_scenario
from tests.unit.parallel.test_dynamic_multi_rank import assert_rows_close

pytestmark = pytest.mark.slow

# Metrics computed from ranks of scores (AUC, GAUC) move by 1/(positives x negatives),
# about 1e-4 here, if two candidates' scores are closer than the layouts' rounding
# differences (~1e-7) and swap; the others are continuous.
RANK_METRICS_ATOL = 1e-3
PLAIN = {"item": {"dim": 8}, "topic": {"dim": 4}, "segment": {"dim": 4}, "activity": {"dim": 4}}
DYNAMIC = {**PLAIN, "item": {"dim": 8, "type": "dynamic", "dynamic": {"capacity": 256, "bucket_size": 16}}}
CP = {"context_parallel_size": 2, "context_parallel_split_threshold": 8}


def config(tmp, name, *, tables=PLAIN, **layout) -> dict:
    raw = base_config(tmp, name, **layout)
    # 4 layers (2 per stage under PP=2), 2 heads; the default dropout (0.2) on the inputs
    # and the STU layers, 0.1 in the tower: keyed masks, the same on every layout.
    raw["model"] = {"type": "ranking", "num_layers": 4, "hidden_size": 16, "num_attention_heads": 2,
                    "qk_head_dim": 8, "v_head_dim": 8, "max_seq_len": 32, "num_time_buckets": 32,
                    "time_bucket_fn": "log"}
    raw["embeddings"] = tables
    raw["ranking"] = {"action_encoder": {"watchtime_thresholds": [5.0], "dim": 4, "mlp_hidden": 8},
                      "content_encoder": {"mlp_hidden": 8}, "tower": {"hidden_sizes": [8], "dropout": 0.1},
                      "output_postprocessor": "timestamp_layernorm"}
    # Histories of 3 to 18 events, 3 candidates per request: sequences of 8 to 23 tokens;
    # odd totals exercise the sequence-parallel padding.
    raw["data"] = {"ranking": {"synthetic": {"num_users": 40, "num_items": 30, "num_topics": 3, "requests_per_user": 3,
                                             "candidates_per_request": 3, "min_warmup_requests": 1,
                                             "max_warmup_requests": 5, "seed": 4}}}
    return raw


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


def assert_metrics_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if key.endswith("auc"):
            assert actual[key] == pytest.approx(value, abs=RANK_METRICS_ATOL), key
        else:
            assert actual[key] == pytest.approx(value, rel=1e-6), key


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
    assert_metrics_close(run["valid"], single["valid"])
    assert 0.0 < single["valid"]["auc"] < 1.0 and "click/gauc" in single["valid"]


def test_ranking_checkpoint_of_tp2_pp2_loads_into_one_rank(records):
    before, after = records["tp2_pp2_sp"], records["tp2pp2_to_single"]
    assert after["start_iteration"] == STEPS
    assert_metrics_close(after["valid"], before["valid"])
    assert after["losses"] == pytest.approx(before["losses"][STEPS:], rel=LOSS_RTOL)
    assert_weights_close(after["final_params"], before["final_params"])
