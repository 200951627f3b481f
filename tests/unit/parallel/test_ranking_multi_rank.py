"""DLRM-HSTU trains the single-rank model on every layout: TP=2 with sequence parallelism
(x DP=2), PP=2 (x DP=2), DP=4, TP=2 x PP=2 with sequence parallelism, all with plain
tables, and TP=2 x DP=2 with sequence parallelism and dynamic (hash) tables, reproduce the
single-rank losses, gradient norms, every gradient and weight (dynamic rows too) over
several steps (dropout off), and evaluate to the same metrics. A checkpoint saved under
TP=2 x PP=2 loads into one rank with the same metrics and continues with the same losses.

Everything parallel runs in one torchrun launch of 4 gloo ranks; the single-rank
references run in-process. Dynamic tables under pipeline parallelism are a config error
(tests/unit/config/test_ranking_config.py).
"""

from __future__ import annotations

import pytest

from tests.unit.parallel.scenarios import run_scenario
from tests.unit.parallel.test_dynamic_multi_rank import assert_rows_close
from tests.unit.parallel.test_multi_rank import AFTER, GRAD_RTOL, LOSS_RTOL, STEPS, WEIGHT_ATOL, assert_tensors_close, launch

pytestmark = pytest.mark.slow

# Metrics computed from ranks of scores (AUC, GAUC) move by 1/(positives x negatives),
# about 1e-4 here, if two candidates' scores are closer than the layouts' rounding
# differences (~1e-7) and swap; the others are continuous.
RANK_METRICS_ATOL = 1e-3
PLAIN = {"item": {"dim": 8}, "topic": {"dim": 4}, "segment": {"dim": 4}, "activity": {"dim": 4}}
DYNAMIC = {**PLAIN, "item": {"dim": 8, "type": "dynamic", "dynamic": {"capacity": 256, "bucket_size": 16}}}


def config(tmp, name, *, tp=1, pp=1, sp=False, tables=PLAIN, save=None, load=None) -> dict:
    return {
        # 4 layers (2 per stage under PP=2), 2 heads; no dropout: layouts draw different masks.
        "model": {"type": "ranking", "num_layers": 4, "hidden_size": 16, "num_attention_heads": 2, "qk_head_dim": 8,
                  "v_head_dim": 8, "max_seq_len": 32, "hidden_dropout": 0.0, "embedding_dropout": 0.0,
                  "num_time_buckets": 32, "time_bucket_fn": "log"},
        "embeddings": tables,
        "ranking": {"action_encoder": {"watchtime_thresholds": [5.0], "dim": 4, "mlp_hidden": 8},
                    "content_encoder": {"mlp_hidden": 8}, "tower": {"hidden_sizes": [8]},
                    "output_postprocessor": "timestamp_layernorm"},
        # Histories of 3 to 18 events, 3 candidates per request: sequences of 8 to 23 tokens;
        # odd totals exercise the sequence-parallel padding.
        "data": {"ranking": {"synthetic": {"num_users": 40, "num_items": 30, "num_topics": 3, "requests_per_user": 3,
                                           "candidates_per_request": 3, "min_warmup_requests": 1,
                                           "max_warmup_requests": 5, "seed": 4}}},
        # 4 micro-batches of 4 requests per step: accumulation on every layout.
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
    tmp = tmp_path_factory.mktemp("ranking_multi_rank")
    ckpt = tmp / "ckpt_tp2pp2"
    four = launch(tmp, 4, [
        {"name": "tp2_pp2_sp", "config": config(tmp, "tp2_pp2_sp", tp=2, pp=2, sp=True, save=ckpt), "steps": STEPS,
         "evaluate": True, "save": True, "steps_after": AFTER},
        parity(tmp, "tp2_sp_dp2", tp=2, sp=True),
        parity(tmp, "pp2_dp2", pp=2),
        parity(tmp, "dp4"),
        parity(tmp, "tp2_sp_dp2_dynamic", tp=2, sp=True, tables=DYNAMIC),
    ])
    single = {
        "single": run_scenario({"name": "single", "config": config(tmp, "single"), "steps": STEPS, "evaluate": True,
                                "steps_after": AFTER}),
        "single_dynamic": run_scenario(parity(tmp, "single_dynamic", tables=DYNAMIC)),
        "tp2pp2_to_single": run_scenario({"name": "loaded", "config": config(tmp, "loaded", load=ckpt),
                                          "evaluate": True, "steps_after": AFTER}),
    }
    return {**four, **single}


def assert_metrics_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if key.endswith("auc"):
            assert actual[key] == pytest.approx(value, abs=RANK_METRICS_ATOL), key
        else:
            assert actual[key] == pytest.approx(value, rel=1e-6), key


LAYOUTS = {  # name: ((tp, pp, dp), single-rank reference)
    "tp2_pp2_sp": ((2, 2, 1), "single"),
    "tp2_sp_dp2": ((2, 1, 2), "single"),
    "pp2_dp2": ((1, 2, 2), "single"),
    "dp4": ((1, 1, 4), "single"),
    "tp2_sp_dp2_dynamic": ((2, 1, 2), "single_dynamic"),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_ranking_layout_reproduces_single_rank(records, name):
    shape, reference = LAYOUTS[name]
    run, single = records[name], records[reference]
    layout = run["layout"]
    assert (layout["tp"], layout["pp"], layout["dp"]) == shape
    steps = len(run["losses"])  # STEPS, or STEPS + AFTER for the layout that also saved
    assert run["losses"] == pytest.approx(single["losses"][:steps], rel=LOSS_RTOL)
    assert run["grad_norms"] == pytest.approx(single["grad_norms"][:steps], rel=LOSS_RTOL)
    for step in range(steps):
        assert_tensors_close(run["grads"][step], single["grads"][step], f"step {step + 1} gradient", rtol=GRAD_RTOL)
    assert_tensors_close(run["params"], single["params"], "weight", atol=WEIGHT_ATOL)
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
    assert_tensors_close(after["final_params"], before["final_params"], "weight", atol=WEIGHT_ATOL)
