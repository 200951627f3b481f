"""A training run's console carries no library warnings (with Python's default warning
filters, as a user runs it): a tiny model on the default device, the default optimizer
(megatron's distributed optimizer), two steps and the final evaluation; and a run that
saves a checkpoint, then one resumed from it. Each run in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "1", "--max-seq-len", "20",
    "--micro-batch-size", "8", "--set", "model.qk_head_dim=8", "--set", "model.v_head_dim=8",
    "--set", "model.ffn_hidden_size=32", "--set", "embeddings.item.dim=16", "--set", "model.num_negatives=8",
    "--set", "model.num_in_batch_negatives=8", "--set", "data.synthetic.num_users=40",
    "--set", "data.synthetic.num_items=50",
]


def _pretrain(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "megatron_gr.cli", "pretrain", "--eval-interval", "0", "--progress", "off",
               *TINY, *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _warnings(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if "Warning" in line]


def test_pretrain_prints_no_library_warnings():
    result = _pretrain("--train-iters", "2")
    assert "final (weights of step 2" in result.stdout  # it trained and evaluated
    assert not _warnings(result), "\n".join(_warnings(result))


@pytest.mark.slow
def test_saving_and_resuming_print_no_library_warnings(tmp_path):
    first = _pretrain("--train-iters", "2", "--save", str(tmp_path))
    assert not _warnings(first), "\n".join(_warnings(first))
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    # the same length: loads the step-2 checkpoint (model, optimizer, best weights) and evaluates
    resumed = _pretrain("--train-iters", "2", "--load", str(tmp_path))
    assert not _warnings(resumed), "\n".join(_warnings(resumed))
