"""tools/benchmarks/e2e_step.py on the CPU: every timed step's FLOPs come from that step's own
micro-batches (rebuilt here from the loader), and the JSON and table are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

FLAGS = ["--cpu", "--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
         "--set", "model.qk_head_dim=8", "--set", "model.v_head_dim=8", "--max-seq-len", "24",
         "--micro-batch-size", "3", "--global-batch-size", "6",
         "--set", "data.synthetic.num_users=40", "--set", "data.synthetic.num_items=30",
         "--set", "data.synthetic.length_distribution=zipf", "--set", "data.synthetic.max_length=40"]


def test_flops_of_each_timed_step_come_from_its_batches(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "tools" / "benchmarks" / "e2e_step.py"), *FLAGS,
               "--warmup", "1", "--steps", "2", "--profile-steps", "1", "--json", str(tmp_path / "e2e.json"),
               "--markdown", str(tmp_path / "e2e.md")]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (row,) = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    assert row["tree"] == "after" and row["variant"] == "default"

    from megatron_gr.config import add_config_arguments, overrides_from_args, resolve_config
    from megatron_gr.models.hstu_flops import step_flops
    from megatron_gr.models.registry import get_train_spec
    from megatron_gr.training.plan import make_plan
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    config = resolve_config(None, overrides_from_args(parser.parse_args(FLAGS)))
    plan = make_plan(config, world_size=1)
    spec = get_train_spec("retrieval")
    stream = spec.training_stream(plan, spec.build_dataset(config), 0, 1)
    stream.next_step()  # the warm-up step
    expected = [step_flops(plan.model_config, [b.lengths for b in stream.next_step()]).total for _ in range(2)]
    assert row["flops_per_step"] == expected
    assert expected[0] != expected[1]  # Zipf lengths: the steps differ, each is counted
    assert row["tflops_per_s"] == pytest.approx(sum(expected) / (row["step_ms"] / 1e3 * 2) / 1e12)
    assert row["mfu_peak"] is None and row["tokens_per_s"] > 0 and len(row["losses"]) == 4
    assert "| after | default |" in (tmp_path / "e2e.md").read_text()


def test_each_variant_runs_in_a_process_of_its_own(tmp_path, monkeypatch):
    """Graph pools of one variant must not outlive it: one worker per variant, the
    matrix-product ceiling timed by the first; a failed worker fails only its variant."""
    from tests.unit.tools.benchmark_tools import load_benchmark

    e2e = load_benchmark("e2e_step")
    launched = []

    def fake_run(command, env):
        spec = json.loads(open(command[-2]).read())
        launched.append((spec["only"], spec["matmul_size"]))
        name = spec["only"][0]
        if name == "broken":
            return subprocess.CompletedProcess(command, 1)
        result = {"matmul_ceiling_tflops": 700.0 if spec["matmul_size"] else None, "variants": {name: {"ran": name}}}
        open(command[-1], "w").write(json.dumps(result))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(e2e.subprocess, "run", fake_run)
    result = e2e.run_tree(REPO_ROOT, {"matmul_size": 8192}, tmp_path, "after", ["a", "broken", "b"])
    assert launched == [(["a"], 8192), (["broken"], 0), (["b"], 0)]
    assert result["matmul_ceiling_tflops"] == 700.0
    assert result["variants"]["a"] == {"ran": "a"} and result["variants"]["b"] == {"ran": "b"}
    assert result["variants"]["broken"] == {"error": "worker exited with 1"}


def test_the_worker_steps_each_tree_as_its_training_loop_does():
    """This tree's loop reads each step while the next runs (``launch_step``); an older
    tree (the "before" rows) has only ``train_step``, each step read at its end."""
    from tests.unit.tools.benchmark_tools import load_benchmark

    worker = load_benchmark("e2e_worker")

    class Older:
        def train_step(self):
            return {"loss": 1.0}

    class Pipelined:
        def __init__(self):
            self.launched = 0

        def launch_step(self):
            self.launched += 1
            return None if self.launched == 1 else {"loss": float(self.launched - 1)}

        def settle_step(self):
            return {"loss": float(self.launched)}

    older = worker._Steps(Older())
    assert older.launch() == [{"loss": 1.0}] and older.finish() == []
    pipelined = worker._Steps(Pipelined())
    records = pipelined.launch() + pipelined.launch() + pipelined.launch() + pipelined.finish()
    assert [r["loss"] for r in records] == [1.0, 2.0, 3.0]
