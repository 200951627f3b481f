"""The mHC kernel tools without a GPU: every fused kernel compiles for an H100 (sm_90a) with
the default blocks and spills no registers for bf16 streams, the merges with and without
their dropout (the interpreter tests cannot see GPU compile errors), and the op benchmark
runs end to end in the interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.paths import REPO_ROOT
from tests.unit.tools.benchmark_tools import load_benchmark

pytest.importorskip("triton")


def run_tool(name: str, *args: str, interpret: bool) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "benchmarks" / name), *args], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_kernels_compile_for_h100_without_spills():
    out = run_tool("mhc_kernel_resources.py", "--streams", "3,4", "--dtypes", "bf16", interpret=False)
    lines = [line for line in out.splitlines() if line.startswith("n=")]
    # mappings fwd, gates, bwd x; pre bwd x, gates; expand pre gates; the fused pairs' five
    # kernels on streams and on the block input, each without and with dropout; Sinkhorn
    # fwd/bwd; aggregate x2; merge x2 without and with dropout
    assert len(lines) == 2 * 34, out
    for line in lines:
        assert "spill_stores=0B" in line, line
    assert all("wgmma=0" not in line for line in lines if "mappings fwd" in line), "projection off tensor cores"


def test_op_benchmark_runs_in_the_interpreter(tmp_path):
    import numpy

    if tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 3):
        pytest.skip("the Triton 3.6 interpreter needs numpy < 2.3")
    path = tmp_path / "mhc.json"
    out = run_tool("mhc_ops.py", "--device", "cpu", "--tokens", "9", "--channels", "20", "--iterations", "2",
                   "--warmup", "0", "--reps", "1", "--json", str(path), interpret=True)
    rows = json.loads(path.read_text())["rows"]
    assert {(r["op"], r["impl"]) for r in rows} == {
        (op, impl) for op in ("mappings", "sinkhorn", "aggregate", "merge", "pre", "sublayer", "sublayer (pre)")
        for impl in ("pytorch", "triton default")
    }
    assert all(r["fwd_us"] > 0 and r["bwd_us"] > 0 for r in rows)
    assert "| sublayer | 9 | 20 | triton default |" in out


def test_op_benchmark_times_the_fused_pairs_in_the_interpreter(tmp_path):
    import numpy

    if tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 3):
        pytest.skip("the Triton 3.6 interpreter needs numpy < 2.3")
    path = tmp_path / "mhc.json"
    ops = "merge+pre,merge_pre,expand+pre,expand_pre,merge+contract,merge_contract"
    run_tool("mhc_ops.py", "--device", "cpu", "--tokens", "9", "--channels", "20", "--iterations", "2",
             "--warmup", "0", "--reps", "1", "--ops", ops, "--impls", "triton", "--json", str(path), interpret=True)
    rows = json.loads(path.read_text())["rows"]
    assert {(r["op"], r["impl"]) for r in rows} == {(op, "triton default") for op in ops.split(",")}
    assert all(r["fwd_us"] > 0 and r["bwd_us"] > 0 and r["fwd_gbs"] > 0 for r in rows)


def test_byte_model_counts_the_passes_over_the_streams():
    """Hand-counted (see the tool's docstring): per merge-pre pair 13 passes over the streams
    and 6 over [T, C] before, 7 and 7 after; a block of 8 sublayers 108 and 52 before,
    48 and 69 after."""

    tool = load_benchmark("mhc_bytes")
    size = dict(tokens=1000, streams=4, channels=64, itemsize=2)
    s, h = 1000 * 4 * 64 * 2, 1000 * 64 * 2  # one pass over the streams, one over [T, C]
    per = tool.sublayer_bytes(**size)
    assert sum(per["before"]) == 13 * s + 6 * h and per["before"][0] == 4 * s + 2 * h
    assert sum(per["after"]) == 7 * s + 7 * h and per["after"][0] == 3 * s + 2 * h
    assert tool.block_bytes(layers=8, **size) == {"before": 108 * s + 52 * h, "after": 48 * s + 69 * h}
    out = run_tool("mhc_bytes.py", "--tokens", "65536", "--channels", "1024", interpret=False)
    assert "| per sublayer, fwd + bwd | 7.78 GB | 4.70 GB | 40% |" in out
