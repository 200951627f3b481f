"""The H100 ranking step benchmark runs end to end (tiny shapes on the CPU) and reports
the token count its shapes imply."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
