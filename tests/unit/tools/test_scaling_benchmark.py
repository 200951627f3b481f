"""tools/benchmarks/scaling.py: the driver launches a run through torchrun and writes the
JSON and the markdown table (CPU, one process; GPU numbers come from GPU machines)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.paths import REPO_ROOT

pytestmark = pytest.mark.slow


def test_single_run_writes_json_and_table(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "tools" / "benchmarks" / "scaling.py"), "--device", "cpu",
               "--size", "tiny", "--runs", "single", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = json.loads((tmp_path / "scaling.json").read_text())["runs"]["single"]
    assert run["gpus"] == 1 and run["steps"] == 2 and run["tokens_per_s"] > 0
    assert run["efficiency"] == 1.0 and run["useful_tflops_per_s_per_gpu"] > 0
    table = (tmp_path / "scaling.md").read_text()
    assert "| single | 1 | 1 | 1 | no | none |" in table and "100.0% |" in table
