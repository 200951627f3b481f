"""The CLI under torchrun: `torchrun --nproc-per-node 4 -m megatron_gr.cli pretrain
--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 ...` trains on CPU (gloo),
saves, and logs the single-rank losses."""

from __future__ import annotations

import pytest
import yaml

from megatron_gr.config import resolve_config
from megatron_gr.training.trainer import Trainer
from tests.support.multirank import run_torchrun
from tests.unit.parallel.layouts import LOSS_RTOL, config
from tests.unit.training.helpers import read_records

pytestmark = pytest.mark.slow


def test_torchrun_cli_runs_tensor_x_pipeline_parallel(megatron_cpu, tmp_path):
    raw = config(tmp_path, "unused")
    del raw["parallel"], raw["checkpoint"]
    raw["logging"] = {"log_interval": 1}
    raw["training"].update(train_iters=2, eval_interval=2)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    metrics = tmp_path / "cli.jsonl"
    output = run_torchrun(4, [
        "-m", "megatron_gr.cli", "pretrain", "--config", str(path),
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel",
        "--save", str(tmp_path / "ckpt"), "--metrics-file", str(metrics), "--progress", "lines",
    ], what="megatron-gr pretrain on 4 ranks")
    assert "final (weights of step 2" in output
    assert (tmp_path / "ckpt" / "iter_0000002").is_dir() and (tmp_path / "ckpt" / "best").is_dir()

    single = resolve_config(str(path), [(["logging", "metrics_file"], str(tmp_path / "single.jsonl")),
                                        (["logging", "progress"], "off")])
    Trainer(single).train()
    losses = [r["loss"] for r in read_records(metrics)]
    expected = [r["loss"] for r in read_records(tmp_path / "single.jsonl")]
    assert len(losses) == 2 and losses == pytest.approx(expected, rel=LOSS_RTOL)
    assert read_records(metrics, "test")[-1]["ndcg@10"] == pytest.approx(read_records(tmp_path / "single.jsonl", "test")[-1]["ndcg@10"], rel=1e-6)
