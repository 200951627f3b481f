"""The keyed-dropout benchmark runs end to end in the Triton interpreter (the GPU runs it at
training sizes: see the tool's docstring)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytest.importorskip("triton")


def test_benchmark_runs_in_the_interpreter(tmp_path):
    import numpy

    if tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 3):
        pytest.skip("the Triton 3.6 interpreter needs numpy < 2.3")
    path = tmp_path / "keyed.json"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "benchmarks" / "keyed_dropout.py"), "--device", "cpu",
         "--tokens", "5", "--width", "16", "--warmup", "0", "--reps", "1", "--json", str(path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(path.read_text())["rows"]
    assert {(r["op"], r["impl"]) for r in rows} == {
        ("stu output", "triton, dropout off"), ("stu output", "triton, dropout on"),
        ("mhc merge n=4", "triton, dropout off"), ("mhc merge n=4", "triton, dropout on"),
        ("dropout", "torch F.dropout"), ("dropout", "keyed, pytorch"), ("dropout", "keyed, triton"),
    }
    assert all(r["fwd_us"] > 0 and r["bwd_us"] > 0 for r in rows)
