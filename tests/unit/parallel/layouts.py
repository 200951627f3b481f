"""What the multi-rank training tests share: the tiny experiment they train, the scenarios
(train, save, resume) built from it, a launch of a plan of scenarios on N gloo ranks, and
the comparisons with the single-rank run.

Tolerances. Every layout computes in fp32 on the CPU; what differs from one rank is only
the order of floating-point sums (tensor-parallel partial products and all-reduces, the
statistics of the head-split norm, data-parallel reductions, how many micro-batch
gradients one rank accumulates, pipeline stages). Such differences scale with the size of
the terms summed, not with the size of each result, and change with the CPU (its SIMD width
changes the order of sums inside the kernels). Seen on one CPU over every layout, with and
without mHC: losses within 1e-7 (relative); gradients within 4.2e-7 of their tensor's
largest entry, except the mHC maps' tensors, whose gradients are near-cancelling sums of
~4e-6 (streams entering the first layer as equal copies) and differ by up to 5.2e-6 of
themselves (4.4e-11; on another CPU 4e-11 broke the 3.7e-11 that 1e-5 of the tensor allowed);
weights within 5.2e-7 of max(their largest entry, 0.1) (a few ulps). So:

- a gradient tensor is compared against ``max(its largest entry, GRAD_FLOOR x the step's
  gradient norm)`` (the norm is 50-70 here) with GRAD_RTOL: 150x what the mHC tensors
  showed, 240x the rest;
- weights against ``max(their largest entry, WEIGHT_FLOOR)`` with WEIGHT_RTOL (57x), losses
  and gradient norms relatively with LOSS_RTOL (100x).

A wrong reduction still fails: a gradient doubled, halved or missing a rank's share moves
its tensor by a sizeable fraction of its largest entry, and every tensor here is far above
the bound (the smallest largest entry, 3.7e-6, is 560x GRAD_RTOL x GRAD_FLOOR x |g|); a
wrong update moves weights by about the learning rate (3e-3). ``test_layouts_tolerances.py``
checks that on recorded magnitudes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.multirank import run_ranks
from tests.support.parity import assert_close_to_scale

STEPS = 3  # optimizer steps compared before a checkpoint
AFTER = 2  # steps after it
LOSS_RTOL = 1e-5  # losses and gradient norms
GRAD_RTOL = 1e-4  # of max(the tensor's largest entry, GRAD_FLOOR x the step's gradient norm)
GRAD_FLOOR = 1e-6
WEIGHT_RTOL = 3e-5  # of max(the tensor's largest entry, WEIGHT_FLOOR)
WEIGHT_FLOOR = 0.1
# The GPU defaults under data parallelism: gradient reduction and weight all-gather
# overlapped, and buckets small enough that several reductions run during the backward.
OVERLAP = {"overlap_grad_reduce": True, "overlap_param_gather": True, "ddp_bucket_size": 2000}
DEFAULT_DROPOUT = {"hidden": 0.2, "embedding": 0.2}  # what the runs use: the defaults
# Metrics computed from ranks of scores (AUC, GAUC) move by 1/(positives x negatives),
# about 1e-4 in the ranking runs, if two candidates' scores are closer than the layouts'
# rounding differences (~1e-7) and swap; the others are continuous.
RANK_METRICS_ATOL = 1e-3
# Seen: dynamic-table rows within 4e-9 of the single rank's (fp32, Adam on the rows);
# sharding the table over the whole world instead of the data-parallel group moves them far more.
ROW_ATOL = 1e-6


def config(tmp: Path, name: str, *, tp=1, pp=1, sp=False, load=None, save=None, **parallel) -> dict:
    return {
        # 4 layers, 2 heads; the default dropout (DEFAULT_DROPOUT): its masks are keyed by
        # the tokens, not drawn per rank, so every layout drops the same elements.
        "model": {"num_layers": 4, "hidden_size": 16, "num_attention_heads": 2, "qk_head_dim": 8,
                  "v_head_dim": 8, "max_seq_len": 32, "num_negatives": 16, "num_in_batch_negatives": 8},
        # Histories of 2 to 32 tokens in one micro-batch; odd token counts (37, 49, ...)
        # exercise the sequence-parallel padding.
        "data": {"synthetic": {"num_users": 80, "num_items": 60, "mean_length": 14.0, "max_length": 60, "seed": 3}},
        # 4 micro-batches of 4 users per step: accumulation on every layout; clipping at 1
        # is active (gradient norms are about 50).
        "training": {"train_iters": STEPS + AFTER, "micro_batch_size": 4, "global_batch_size": 16, "lr": 3e-3,
                     "lr_warmup_iters": 1, "eval_interval": 0, "device": "cpu", "eval_batch_size": 16},
        # micro_batch_balance left at its default (auto: another cut on 1 and on 2+ data-
        # parallel ranks, which must not change the objective)
        "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                     "sequence_parallel": sp, **parallel},
        "checkpoint": {"save": str(save) if save else None, "load": str(load) if load else None},
        "logging": {"progress": "off", "metrics_file": str(tmp / f"{name}.jsonl")},
    }


def parity(name: str, raw: dict) -> dict:
    """Train STEPS steps, then evaluate."""
    return {"name": name, "config": raw, "steps": STEPS, "evaluate": True}


def saving(name: str, raw: dict) -> dict:
    """Train STEPS steps, evaluate, save into ``raw``'s checkpoint.save, train AFTER more."""
    return {"name": name, "config": raw, "steps": STEPS, "evaluate": True, "save": True, "steps_after": AFTER}


def resuming(name: str, raw: dict) -> dict:
    """Load ``raw``'s checkpoint.load, evaluate, train AFTER steps."""
    return {"name": name, "config": raw, "evaluate": True, "steps_after": AFTER}


def single_rank(name: str, raw: dict) -> dict:
    """The single-rank reference: STEPS steps, evaluate, AFTER more."""
    return {"name": name, "config": raw, "steps": STEPS, "evaluate": True, "steps_after": AFTER}


def launch(tmp: Path, ranks: int, plan: list[dict]) -> dict:
    """Runs the plan's scenarios in order in one process group of ``ranks`` gloo ranks;
    returns rank 0's records by scenario name."""
    return run_ranks(ranks, "tests.unit.parallel.scenarios:run_plan", plan, workdir=tmp)


def assert_same_training(run: dict, reference: dict, *, weights=None) -> None:
    """Losses, gradient norms and every gradient of ``run``'s steps equal the reference's
    first steps; its weights after the first phase too (``weights``: the comparison)."""
    steps = len(run["losses"])
    assert run["losses"] == pytest.approx(reference["losses"][:steps], rel=LOSS_RTOL)
    assert run["grad_norms"] == pytest.approx(reference["grad_norms"][:steps], rel=LOSS_RTOL)
    for step in range(steps):
        assert_grads_close(run["grads"][step], reference["grads"][step], reference["grad_norms"][step], step + 1)
    (weights or assert_weights_close)(run["params"], reference["params"])


def assert_resumed(after: dict, before: dict, *, metrics=None, weights=None) -> None:
    """The run that loaded ``before``'s checkpoint starts at STEPS, evaluates to its metrics
    (``metrics``: the comparison; default within 1e-6 relative) and continues with its
    losses and weights (``weights``: the comparison)."""
    assert after["start_iteration"] == STEPS
    if metrics is None:
        assert after["valid"] == pytest.approx(before["valid"], rel=1e-6)
    else:
        metrics(after["valid"], before["valid"])
    assert after["losses"] == pytest.approx(before["losses"][STEPS:], rel=LOSS_RTOL)
    (weights or assert_weights_close)(after["final_params"], before["final_params"])


def assert_rank_metrics_close(actual: dict, expected: dict) -> None:
    """Metrics computed from ranks of scores (keys ending in ``auc``) within
    RANK_METRICS_ATOL, the others within 1e-6 relative."""
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if key.endswith("auc"):
            assert actual[key] == pytest.approx(value, abs=RANK_METRICS_ATOL), key
        else:
            assert actual[key] == pytest.approx(value, rel=1e-6), key


def assert_rows_close(actual: dict, expected: dict) -> None:
    """Every dynamic table stores the same ids with rows within ROW_ATOL; its
    tensor-parallel copies are equal."""
    assert actual["replica_max_diff"] == 0.0, "tensor-parallel copies of a dynamic table differ"
    assert actual.keys() == expected.keys()
    for name, rows in expected.items():
        if name == "replica_max_diff":
            continue
        assert actual[name].keys() == rows.keys(), f"dynamic table {name} stores other ids"
        error = max(float((actual[name][key] - row).abs().max()) for key, row in rows.items())
        assert error <= ROW_ATOL, f"dynamic table {name}: rows differ by {error:.2e}"


def assert_grads_close(actual: dict, expected: dict, grad_norm: float, step: int) -> None:
    """Every gradient within GRAD_RTOL of max(its largest entry, GRAD_FLOOR x the step's
    gradient norm); every replica equal to its main copy."""
    _assert_replicas_and_keys(actual, expected, "gradient")
    for key, value in _tensors(expected):
        assert_close_to_scale(actual[key], value, rtol=GRAD_RTOL, floor=GRAD_FLOOR * grad_norm,
                              what=f"step {step} gradient {key}")


def assert_weights_close(actual: dict, expected: dict) -> None:
    """Every weight within WEIGHT_RTOL of max(its largest entry, WEIGHT_FLOOR); every
    replica equal to its main copy."""
    _assert_replicas_and_keys(actual, expected, "weight")
    for key, value in _tensors(expected):
        assert_close_to_scale(actual[key], value, rtol=WEIGHT_RTOL, floor=WEIGHT_FLOOR, what=f"weight {key}")


def _assert_replicas_and_keys(actual: dict, expected: dict, what: str) -> None:
    assert actual["replica_max_diff"] == 0.0, f"copies of a {what} differ across ranks"
    assert actual.keys() == expected.keys()


def _tensors(values: dict):
    return ((key, value) for key, value in values.items() if key != "replica_max_diff")
