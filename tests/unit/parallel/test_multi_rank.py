"""Every parallel layout trains the single-rank model: TP=2 with and without sequence
parallelism, PP=2, DP=2 (distributed optimizer), TP=2 x PP=2 and PP=2 x DP=2, and context
parallelism CP=2 alone and with TP=2 + SP, PP=2 and DP=2, reproduce the single-rank losses,
gradient norms and every parameter's gradient (fp32, jagged batches of very different
lengths, gradient accumulation over micro-batches, clipping active) over several steps,
evaluate to the same metrics, and checkpoints saved under one layout load under another
with the same metrics and the same next losses (CP=2 -> one rank, TP=2 x PP=2 -> CP=2).
PP=2 x DP=2 and CP=2 x DP=2 run with the GPU settings (overlapped gradient reduction and
weight all-gather, several buckets). Under CP the histories of 2 to 32 tokens are split over
the two ranks above 8 tokens and placed whole below, so every micro-batch mixes both.
CP=2 and CP=2 x TP=2 also reproduce one rank on histories of 2k-8k tokens with every mask
the model has (tests/unit/parallel/long_histories.py).

Ranks are gloo processes started with torchrun: one launch of 4 ranks, then one of 2 ranks
(it loads a checkpoint the 4-rank launch saved). Single-rank references run in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.unit.parallel.long_histories import long_scenario
from tests.unit.parallel.scenarios import run_scenario

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("worker.py")
REPO = Path(__file__).resolve().parents[3]
STEPS = 3  # optimizer steps compared before a checkpoint
AFTER = 2  # steps after it
# fp32 on one CPU: what differs between layouts is only the order of floating-point sums
# (tensor-parallel partial products, all-reduces, the statistics of the head-split norm).
# Seen: losses within 1e-7 (relative), gradients within 4e-7 of each tensor's largest
# entry, weights within 2e-7; a wrong reduction is off by far more (a doubled data-parallel
# reduction moved gradients by 30%).
LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-5  # of the tensor's largest entry
WEIGHT_ATOL = 1e-6
# The GPU defaults under data parallelism: gradient reduction and weight all-gather
# overlapped, and buckets small enough that several reductions run during the backward.
OVERLAP = {"overlap_grad_reduce": True, "overlap_param_gather": True, "ddp_bucket_size": 2000}
# Context parallelism over two ranks; histories longer than 8 tokens are split.
CP = {"context_parallel_size": 2, "context_parallel_split_threshold": 8}
# Histories of thousands of tokens: the relative-bias weights' gradients sum ~10^7 pair
# terms of both signs, in another order per layout. Seen under CP=2: within 8e-6 of the
# tensor's largest entry (every other gradient within 4e-6); one chunk placed one
# position off moves every gradient by 4e-2 (seen at the op level, 2200 tokens).
LONG_GRAD_RTOL = 1e-4


def config(tmp: Path, name: str, *, tp=1, pp=1, sp=False, load=None, save=None, **parallel) -> dict:
    return {
        # 4 layers, 2 heads; no dropout: parallel layouts draw different dropout masks.
        "model": {"num_layers": 4, "hidden_size": 16, "num_attention_heads": 2, "qk_head_dim": 8,
                  "v_head_dim": 8, "max_seq_len": 32, "hidden_dropout": 0.0, "embedding_dropout": 0.0,
                  "num_negatives": 16, "num_in_batch_negatives": 8},
        # Histories of 2 to 32 tokens in one micro-batch; odd token counts (37, 49, ...)
        # exercise the sequence-parallel padding.
        "data": {"synthetic": {"num_users": 80, "num_items": 60, "mean_length": 14.0, "max_length": 60, "seed": 3}},
        # 4 micro-batches of 4 users per step: accumulation on every layout; clipping at 1
        # is active (gradient norms are about 50).
        "training": {"train_iters": STEPS + AFTER, "micro_batch_size": 4, "global_batch_size": 16, "lr": 3e-3,
                     "lr_warmup_iters": 1, "eval_interval": 0, "device": "cpu", "eval_batch_size": 16},
        "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                     "sequence_parallel": sp, "micro_batch_balance": "attention_cost", **parallel},
        "checkpoint": {"save": str(save) if save else None, "load": str(load) if load else None},
        "logging": {"progress": "off", "metrics_file": str(tmp / f"{name}.jsonl")},
    }


def parity(tmp, name, **layout) -> dict:
    return {"name": name, "config": config(tmp, name, **layout), "steps": STEPS, "evaluate": True}


def saving(tmp, name, ckpt, **layout) -> dict:
    return {"name": name, "config": config(tmp, name, save=ckpt, **layout), "steps": STEPS, "evaluate": True,
            "save": True, "steps_after": AFTER}


def resuming(tmp, name, ckpt, **layout) -> dict:
    return {"name": name, "config": config(tmp, name, load=ckpt, **layout), "evaluate": True, "steps_after": AFTER}


def launch(tmp: Path, ranks: int, plan: list[dict]) -> dict:
    plan_file, out = tmp / f"plan{ranks}.json", tmp / f"records{ranks}.pt"
    plan_file.write_text(json.dumps(plan))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               str(WORKER), str(plan_file), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def records(megatron_cpu, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi_rank")
    four = launch(tmp, 4, [
        saving(tmp, "tp2_pp2_sp", tmp / "ckpt_tp2pp2", tp=2, pp=2, sp=True),
        saving(tmp, "pp2_dp2", tmp / "ckpt_pp2dp2", pp=2, **OVERLAP),
        parity(tmp, "cp2_tp2_sp", tp=2, sp=True, **CP),
        parity(tmp, "cp2_pp2", pp=2, **CP),
        parity(tmp, "cp2_dp2", **CP, **OVERLAP),
        long_scenario(tmp, "long_sla_cp2_tp2_sp", "sla", tensor_model_parallel_size=2, sequence_parallel=True,
                      context_parallel_size=2),
        long_scenario(tmp, "long_window_cp2_tp2", "window", tensor_model_parallel_size=2, context_parallel_size=2),
    ])
    two = launch(tmp, 2, [
        parity(tmp, "tp2", tp=2),
        parity(tmp, "tp2_sp", tp=2, sp=True),
        parity(tmp, "pp2", pp=2),
        parity(tmp, "dp2"),
        resuming(tmp, "tp2pp2_to_pp2", tmp / "ckpt_tp2pp2", pp=2),
        saving(tmp, "cp2", tmp / "ckpt_cp2", **CP),
        resuming(tmp, "tp2pp2_to_cp2", tmp / "ckpt_tp2pp2", **CP),
        long_scenario(tmp, "long_sla_cp2", "sla", context_parallel_size=2),
        long_scenario(tmp, "long_window_cp2", "window", context_parallel_size=2),
    ])
    single = {
        "single": run_scenario({"name": "single", "config": config(tmp, "single"), "steps": STEPS,
                                "evaluate": True, "steps_after": AFTER}),
        "tp2pp2_to_single": run_scenario(resuming(tmp, "tp2pp2_to_single", tmp / "ckpt_tp2pp2")),
        "pp2dp2_to_single": run_scenario(resuming(tmp, "pp2dp2_to_single", tmp / "ckpt_pp2dp2")),
        "cp2_to_single": run_scenario(resuming(tmp, "cp2_to_single", tmp / "ckpt_cp2")),
        "long_sla": run_scenario(long_scenario(tmp, "long_sla", "sla")),
        "long_window": run_scenario(long_scenario(tmp, "long_window", "window")),
    }
    return {**four, **two, **single}


LAYOUTS = {  # name: (tp, pp, dp, cp); every layout uses the distributed optimizer
    "tp2": (2, 1, 1, 1),
    "tp2_sp": (2, 1, 1, 1),
    "pp2": (1, 2, 1, 1),
    "dp2": (1, 1, 2, 1),
    "tp2_pp2_sp": (2, 2, 1, 1),
    "pp2_dp2": (1, 2, 2, 1),
    "cp2": (1, 1, 1, 2),
    "cp2_tp2_sp": (2, 1, 1, 2),
    "cp2_pp2": (1, 2, 1, 2),
    "cp2_dp2": (1, 1, 2, 2),
}


def assert_tensors_close(actual: dict, expected: dict, what: str, *, atol: float = 0.0, rtol: float = 0.0) -> None:
    """Every tensor within ``atol + rtol x its largest entry``; every replica equal to its
    main copy."""
    assert actual["replica_max_diff"] == 0.0, f"copies of a {what} differ across ranks"
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if key != "replica_max_diff":
            error = float((actual[key] - value).abs().max())
            assert error <= atol + rtol * float(value.abs().max()), f"{what} {key}: max difference {error:.2e}"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_reproduces_single_rank(records, name):
    run, single = records[name], records["single"]
    layout = run["layout"]
    assert (layout["tp"], layout["pp"], layout["dp"], layout["cp"]) == LAYOUTS[name] and layout["distributed_optimizer"]
    if name in ("pp2_dp2", "cp2_dp2"):
        assert layout["overlap_grad_reduce"] and layout["overlap_param_gather"] and layout["buckets"] > 2
    steps = len(run["losses"])  # STEPS, or STEPS + AFTER for the layouts that also saved
    assert run["losses"] == pytest.approx(single["losses"][:steps], rel=LOSS_RTOL)
    assert run["grad_norms"] == pytest.approx(single["grad_norms"][:steps], rel=LOSS_RTOL)
    for step in range(steps):
        assert_tensors_close(run["grads"][step], single["grads"][step], f"step {step + 1} gradient", rtol=GRAD_RTOL)
    assert_tensors_close(run["params"], single["params"], "weight", atol=WEIGHT_ATOL)
    assert run["valid"] == pytest.approx(single["valid"], rel=1e-6)


@pytest.mark.parametrize("name, single, layout", [
    ("long_sla_cp2", "long_sla", (1, 2)), ("long_sla_cp2_tp2_sp", "long_sla", (2, 2)),
    ("long_window_cp2", "long_window", (1, 2)), ("long_window_cp2_tp2", "long_window", (2, 2)),
])
def test_long_histories_reproduce_single_rank(records, name, single, layout):
    """Histories of 2k-8k tokens split over the ranks, semi-local attention with the
    relative bias, and a local window: loss, gradient norm, every gradient and the weights
    after the step."""
    run, single = records[name], records[single]
    assert (run["layout"]["tp"], run["layout"]["cp"]) == layout
    assert run["losses"] == pytest.approx(single["losses"], rel=LOSS_RTOL)
    assert run["grad_norms"] == pytest.approx(single["grad_norms"], rel=LOSS_RTOL)
    assert_tensors_close(run["grads"][0], single["grads"][0], "gradient", rtol=LONG_GRAD_RTOL)
    assert_tensors_close(run["params"], single["params"], "weight", atol=WEIGHT_ATOL)


@pytest.mark.parametrize("saved, loaded", [
    ("tp2_pp2_sp", "tp2pp2_to_single"), ("tp2_pp2_sp", "tp2pp2_to_pp2"), ("pp2_dp2", "pp2dp2_to_single"),
    ("cp2", "cp2_to_single"), ("tp2_pp2_sp", "tp2pp2_to_cp2"),
])
def test_checkpoint_loads_under_another_layout(records, saved, loaded):
    """Model and optimizer state (distributed optimizer shards included) reshard: the loaded
    run evaluates to the saved run's metrics and continues with its losses."""
    before, after = records[saved], records[loaded]
    assert after["start_iteration"] == STEPS
    assert after["valid"] == pytest.approx(before["valid"], rel=1e-6)
    assert after["losses"] == pytest.approx(before["losses"][STEPS:], rel=LOSS_RTOL)
    assert_tensors_close(after["final_params"], before["final_params"], "weight", atol=WEIGHT_ATOL)
