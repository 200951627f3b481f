"""The H100 ranking step benchmark runs end to end (tiny shapes on the CPU) and reports
the token count its shapes imply."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.unit.tools.benchmark_tools import load_benchmark

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_ranking_step_benchmark_prints_a_row(tmp_path):
    command = [sys.executable, "tools/benchmarks/ranking_step.py", "--device", "cpu", "--backend", "pytorch",
               "--history", "24", "--candidates", "4", "--hidden", "16", "--heads", "2", "--head-dim", "8",
               "--layers", "1", "--users-per-batch", "3", "--steps", "2", "--json", str(tmp_path / "out.json")]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    row = [line for line in result.stdout.splitlines() if line.startswith("| cpu |")]
    assert len(row) == 1 and "3 x (2 + 24 + 4) = 90 |" in row[0]  # every user: exactly 24 history events
    summary = __import__("json").loads((tmp_path / "out.json").read_text())
    assert summary["tokens_per_step"] == 90 and summary["tokens_per_s"] > 0


def load_tool():
    return load_benchmark("ranking_step")


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "rowwise"])
def test_fp8_switch_configures_the_models_fp8_fields(recipe):
    from megatron_gr.config import ExperimentConfig

    tool = load_tool()
    args = argparse.Namespace(history=24, candidates=4, users_per_batch=3, layers=1, hidden=32, heads=2, head_dim=16,
                              relative_bias=True, device="cpu", backend="pytorch", precision="auto", fp8=recipe,
                              fp8_format="e4m3")
    model = ExperimentConfig.from_dict(tool.benchmark_config(args)).model
    assert (model.fp8, model.fp8_recipe) == ("e4m3", recipe)
    assert model.fp8_amax_history_len == (16 if recipe == "delayed" else 1)
    assert tool.precision_label(args, bf16=True) == f"bf16 + fp8 {recipe} (e4m3)"
    assert ExperimentConfig.from_dict(tool.benchmark_config(argparse.Namespace(**{**vars(args), "fp8": None}))).model.fp8 is None


@pytest.mark.slow
def test_fp8_on_the_cpu_stops_with_one_line(tmp_path):
    command = [sys.executable, "tools/benchmarks/ranking_step.py", "--device", "cpu", "--backend", "pytorch",
               "--history", "24", "--candidates", "4", "--hidden", "32", "--heads", "2", "--head-dim", "16",
               "--layers", "1", "--users-per-batch", "3", "--steps", "1", "--fp8", "tensorwise"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("ranking_step:")]
    assert len(errors) == 1 and "model.fp8='hybrid' (fp8_recipe='tensorwise') cannot run here" in errors[0]
    assert "Traceback" not in result.stderr
