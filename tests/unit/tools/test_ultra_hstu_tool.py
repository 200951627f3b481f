"""The ULTRA-HSTU benchmark (H100: speed at 8k histories and synthetic test AUC, DLRM-HSTU
against ULTRA-HSTU) runs end to end on tiny CPU shapes and reports what its shapes imply."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_ultra_hstu_benchmark_writes_both_parts(tmp_path):
    command = [sys.executable, "tools/benchmarks/ultra_hstu.py", "--device", "cpu", "--backend", "pytorch",
               "--history", "24", "--candidates", "4", "--hidden", "16", "--heads", "2", "--head-dim", "8",
               "--layers", "2", "--users-per-batch", "2", "--steps", "1", "--warmup-steps", "1",
               "--quality-steps", "2", "--quality-users", "40", "--out", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    dlrm, ultra = summary["speed"]["dlrm_hstu"], summary["speed"]["ultra_hstu"]
    assert dlrm["tokens_per_step"] == 2 * (2 + 24 + 4)  # every user: exactly 24 history events
    assert ultra["tokens_per_step"] > dlrm["tokens_per_step"]  # the click channel's tokens too
    assert summary["speedup"] == pytest.approx(dlrm["median_step_s"] / ultra["median_step_s"])
    for model in ("dlrm_hstu", "ultra_hstu"):
        quality = summary["quality"][model]
        assert quality["steps"] == 2 and 0.0 < quality["test_auc"] < 1.0 and 0.5 < quality["bayes_auc"] < 1.0
    assert "| ULTRA-HSTU |" in result.stdout
