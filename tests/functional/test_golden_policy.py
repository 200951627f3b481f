"""The golden suite's tolerance policy on hand-made records: what passes and what fails."""

from __future__ import annotations

import copy

from tests.functional.golden import CPU_FP32, GPU_BF16, differences

GOLDEN = {
    "eval_users": 100,
    "steps": [{"step": 1, "loss": 10.0, "grad_norm": 2.0, "lr": 1e-3}, {"step": 2, "loss": 9.0, "grad_norm": 1.5, "lr": 5e-4}],
    "evaluations": [{"step": 2, "split": "valid", "hr@10": 0.30, "ndcg@10": 0.12}],
    "step_time_s": 0.10,
    "peak_memory_gib": 2.0,
}


def _moved(path, value):
    record = copy.deepcopy(GOLDEN)
    node = record
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return record


def test_identical_record_passes():
    assert differences(copy.deepcopy(GOLDEN), GOLDEN, CPU_FP32) == []


def test_cpu_losses_within_reordered_sums_pass_and_real_changes_fail():
    assert differences(_moved(("steps", 1, "loss"), 9.0 * (1 + 1e-7)), GOLDEN, CPU_FP32) == []
    assert differences(_moved(("steps", 1, "loss"), 9.0 * (1 + 1e-4)), GOLDEN, CPU_FP32) == [
        "step 2 loss: 9.0009 != golden 9.0 (tolerance rel 1e-05, abs 0)"]
    assert differences(_moved(("steps", 0, "lr"), 2e-3), GOLDEN, CPU_FP32)
    assert differences(_moved(("steps", 0, "grad_norm"), 2.01), GOLDEN, CPU_FP32)


def test_cpu_metrics_allow_one_user_moving_one_rank():
    assert differences(_moved(("evaluations", 0, "hr@10"), 0.30 + 1 / 100), GOLDEN, CPU_FP32) == []
    assert differences(_moved(("evaluations", 0, "hr@10"), 0.30 + 2 / 100), GOLDEN, CPU_FP32)
    assert differences(_moved(("evaluations", 0, "ndcg@10"), float("nan")), GOLDEN, CPU_FP32), "NaN never matches"


def test_a_missing_step_or_evaluation_fails():
    shorter = copy.deepcopy(GOLDEN)
    shorter["steps"].pop()
    assert differences(shorter, GOLDEN, CPU_FP32)
    shorter = copy.deepcopy(GOLDEN)
    shorter["evaluations"] = []
    assert differences(shorter, GOLDEN, CPU_FP32)


def test_gpu_bands_and_speed_and_memory():
    assert differences(_moved(("steps", 1, "loss"), 9.1), GOLDEN, GPU_BF16) == []
    assert differences(_moved(("steps", 1, "loss"), 9.5), GOLDEN, GPU_BF16)
    assert differences(_moved(("step_time_s",), 0.05), GOLDEN, GPU_BF16) == [], "faster passes"
    assert differences(_moved(("step_time_s",), 0.14), GOLDEN, GPU_BF16)
    assert differences(_moved(("peak_memory_gib",), 2.25), GOLDEN, GPU_BF16) == []
    assert differences(_moved(("peak_memory_gib",), 2.4), GOLDEN, GPU_BF16)
