"""ULTRA-HSTU trains the single-rank model on every layout: a two-channel model (channels
of different widths, one with semi-local attention, both with attention truncation — one
split inside the first pipeline stage, one at the stage boundary — and rematerialization)
under TP=2 with sequence parallelism (x DP=2), PP=2 (x DP=2) and TP=2 x PP=2 with sequence
parallelism reproduces the single-rank losses, gradient norms, every gradient and weight
over several steps and evaluates to the same metrics; with hyper-connections (n streams
truncated alike, exchanged between stages) PP=2 x DP=2 reproduces its single rank; a
checkpoint saved under TP=2 x PP=2 loads into one rank with the same metrics and next
losses. Dropout is off (masks differ between layouts).

All parallel layouts run in one torchrun launch of 4 gloo ranks; the single-rank
references run in-process.
"""

from __future__ import annotations

import pytest

from tests.unit.parallel.scenarios import run_scenario
from tests.unit.parallel.test_multi_rank import AFTER, GRAD_RTOL, LOSS_RTOL, STEPS, WEIGHT_ATOL, assert_tensors_close, launch
from tests.unit.parallel.test_ranking_multi_rank import RANK_METRICS_ATOL, assert_metrics_close

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


def config(tmp, name, *, tp=1, pp=1, sp=False, mhc=False, save=None, load=None) -> dict:
    return {
        "model": {"type": "ranking", "num_layers": 4, "hidden_size": 16, "num_attention_heads": 2, "qk_head_dim": 8,
                  "v_head_dim": 8, "max_seq_len": 32, "hidden_dropout": 0.0, "embedding_dropout": 0.0,
                  "num_time_buckets": 32, "time_bucket_fn": "log", "transducers": CHANNELS,
                  "recompute_uvqk": True, "recompute_normed_x": not mhc,
                  "enable_hyper_connections": mhc, "num_residual_streams": 2},
        "embeddings": TABLES,
        "ranking": {"features": GROUPS, "action_encoder": {"watchtime_thresholds": [5.0], "dim": 4, "mlp_hidden": 8},
                    "content_encoder": {"mlp_hidden": 8}, "tower": {"hidden_sizes": [8]},
                    "output_postprocessor": "timestamp_layernorm"},
        # Histories of 3 to 18 events (clicks: fewer), 3 candidates per request; odd token
        # totals exercise the sequence-parallel padding before and after truncation.
        "data": {"ranking": {"synthetic": {"num_users": 40, "num_items": 30, "num_topics": 3, "requests_per_user": 3,
                                           "candidates_per_request": 3, "min_warmup_requests": 1,
                                           "max_warmup_requests": 5, "seed": 4}}},
        "training": {"train_iters": STEPS + AFTER, "micro_batch_size": 4, "global_batch_size": 16, "lr": 3e-3,
                     "lr_warmup_iters": 1, "eval_interval": 0, "device": "cpu", "eval_batch_size": 16},
        "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "sequence_parallel": sp,
                     "micro_batch_balance": "attention_cost"},
        "checkpoint": {"save": str(save) if save else None, "load": str(load) if load else None},
        "logging": {"progress": "off", "metrics_file": str(tmp / f"{name}.jsonl")},
    }


def parity(tmp, name, **layout) -> dict:
    return {"name": name, "config": config(tmp, name, **layout), "steps": STEPS, "evaluate": True}


@pytest.fixture(scope="module")
def records(megatron_cpu, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ultra_multi_rank")
    ckpt = tmp / "ckpt_tp2pp2"
    four = launch(tmp, 4, [
        {"name": "tp2_pp2_sp", "config": config(tmp, "tp2_pp2_sp", tp=2, pp=2, sp=True, save=ckpt), "steps": STEPS,
         "evaluate": True, "save": True, "steps_after": AFTER},
        parity(tmp, "tp2_sp_dp2", tp=2, sp=True),
        parity(tmp, "pp2_dp2", pp=2),
        parity(tmp, "pp2_dp2_mhc", pp=2, mhc=True),
    ])
    single = {
        "single": run_scenario({"name": "single", "config": config(tmp, "single"), "steps": STEPS, "evaluate": True,
                                "steps_after": AFTER}),
        "single_mhc": run_scenario(parity(tmp, "single_mhc", mhc=True)),
        "tp2pp2_to_single": run_scenario({"name": "loaded", "config": config(tmp, "loaded", load=ckpt),
                                          "evaluate": True, "steps_after": AFTER}),
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
    layout = run["layout"]
    assert (layout["tp"], layout["pp"], layout["dp"]) == shape
    steps = len(run["losses"])
    assert run["losses"] == pytest.approx(single["losses"][:steps], rel=LOSS_RTOL)
    assert run["grad_norms"] == pytest.approx(single["grad_norms"][:steps], rel=LOSS_RTOL)
    for step in range(steps):
        assert_tensors_close(run["grads"][step], single["grads"][step], f"step {step + 1} gradient", rtol=GRAD_RTOL)
    assert_tensors_close(run["params"], single["params"], "weight", atol=WEIGHT_ATOL)
    assert any(key.startswith("channels.click.") for key in single["params"])
    assert_metrics_close(run["valid"], single["valid"])
    assert 0.0 < single["valid"]["auc"] < 1.0 and RANK_METRICS_ATOL > 0


def test_ultra_checkpoint_of_tp2_pp2_loads_into_one_rank(records):
    before, after = records["tp2_pp2_sp"], records["tp2pp2_to_single"]
    assert after["start_iteration"] == STEPS
    assert_metrics_close(after["valid"], before["valid"])
    assert after["losses"] == pytest.approx(before["losses"][STEPS:], rel=LOSS_RTOL)
    assert_tensors_close(after["final_params"], before["final_params"], "weight", atol=WEIGHT_ATOL)
