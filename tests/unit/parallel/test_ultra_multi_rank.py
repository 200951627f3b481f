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
from tests.unit.parallel.test_ranking_multi_rank import assert_metrics_close

pytestmark = pytest.mark.slow

TABLES = {"item": {"dim": 8}, "topic": {"dim": 4}, "segment": {"dim": 4}, "activity": {"dim": 4}}
CHANNELS = [
    # 4 layers: the layer after the split (2) is on the first stage under PP=2
    {"name": "imp", "num_layers": 4, "sla_k1": 6, "sla_k2": 4, "attn_truncation_split_layer": 1,
     "attn_truncation_tail_len": 5},
    # 2 layers: the split is the stage boundary; the second stage's layer truncates
    {"name": "click", "num_layers": 2, "hidden_size": 8, "qk_head_dim": 4, "v_head_dim": 4,
     "attn_truncation_split_layer": 1, "attn_truncation_tail_len": 2},
]
GROUPS = {
    "imp": {"item_id": "item", "item_topic": "topic"}, "imp_action": "action", "imp_watchtime": "watch_time",
    "imp_timestamp": "timestamp",
    "click": {"click_item_id": "item", "click_item_topic": "topic"}, "click_action": "click_action",
    "click_watchtime": "click_watch_time", "click_timestamp": "click_timestamp",
}


def config(tmp, name, *, mhc=False, **layout) -> dict:
    raw = base_config(tmp, name, **layout)
    # the default dropout (0.2) on the inputs and the STU layers, 0.1 in the tower
    raw["model"] = {"type": "ranking", "num_layers": 4, "hidden_size": 16, "num_attention_heads": 2, "qk_head_dim": 8,
                    "v_head_dim": 8, "max_seq_len": 32, "num_time_buckets": 32, "time_bucket_fn": "log",
                    "transducers": CHANNELS, "recompute_uvqk": True, "recompute_normed_x": not mhc,
                    "enable_hyper_connections": mhc, "num_residual_streams": 2}
    raw["embeddings"] = TABLES
    raw["ranking"] = {"features": GROUPS, "action_encoder": {"watchtime_thresholds": [5.0], "dim": 4, "mlp_hidden": 8},
                      "content_encoder": {"mlp_hidden": 8}, "tower": {"hidden_sizes": [8], "dropout": 0.1},
                      "output_postprocessor": "timestamp_layernorm"}
    # Histories of 3 to 18 events (clicks: fewer), 3 candidates per request; odd token
    # totals exercise the sequence-parallel padding before and after truncation.
    raw["data"] = {"ranking": {"synthetic": {"num_users": 40, "num_items": 30, "num_topics": 3, "requests_per_user": 3,
                                             "candidates_per_request": 3, "min_warmup_requests": 1,
                                             "max_warmup_requests": 5, "seed": 4}}}
    return raw


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
    assert_metrics_close(run["valid"], single["valid"])
    assert 0.0 < single["valid"]["auc"] < 1.0


def test_ultra_checkpoint_of_tp2_pp2_loads_into_one_rank(records):
    before, after = records["tp2_pp2_sp"], records["tp2pp2_to_single"]
    assert after["start_iteration"] == STEPS
    assert_metrics_close(after["valid"], before["valid"])
    assert after["losses"] == pytest.approx(before["losses"][STEPS:], rel=LOSS_RTOL)
    assert_weights_close(after["final_params"], before["final_params"])
