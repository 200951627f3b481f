"""Resume equals uninterrupted: N steps, save, load and N more give the same losses (CPU,
fp32, dropout on) as 2N steps straight."""

from __future__ import annotations

import pytest

from megatron_gr.training.trainer import Trainer
from tests.unit.training.helpers import read_records, tiny_config


def test_resume_equals_uninterrupted(megatron_cpu, tmp_path):
    straight = tiny_config(tmp_path / "straight")
    Trainer(straight).train()
    expected = [r["loss"] for r in read_records(straight.logging.metrics_file)]

    ckpt = str(tmp_path / "ckpt")
    first = tiny_config(tmp_path / "resumed", training={"train_iters": 3}, checkpoint={"save": ckpt})
    Trainer(first).train()
    second = tiny_config(tmp_path / "resumed", checkpoint={"save": ckpt, "load": ckpt})
    trainer = Trainer(second)
    assert trainer.state.iteration == 3
    trainer.train()
    resumed = [r["loss"] for r in read_records(second.logging.metrics_file)]

    assert len(expected) == 6 and len(resumed) == 6
    assert resumed == expected  # bitwise: model, optimizer, schedule, RNG and data position


def test_load_from_empty_directory_starts_fresh(megatron_cpu, tmp_path):
    config = tiny_config(tmp_path, training={"train_iters": 2, "lr_decay_iters": 2, "lr_warmup_iters": 0},
                         checkpoint={"load": str(tmp_path / "nothing")})
    trainer = Trainer(config)
    assert trainer.state.iteration == 0


@pytest.mark.gpu
def test_gpu_resume_with_fused_adam_equals_uninterrupted(tmp_path):
    """bf16 on a GPU: fused Adam's state (its step counters on the device) survives a save and
    a load; the relative bias is off (its weight gradients add with atomics in no fixed
    order), so the two runs differ only by bf16 rounding of the same arithmetic."""
    gpu = {"device": "cuda", "kernel_backend": "triton"}
    model = {"relative_attention_bias": False}
    straight = tiny_config(tmp_path / "straight", training=gpu, model=model)
    Trainer(straight).train()
    expected = [r["loss"] for r in read_records(straight.logging.metrics_file)]
    ckpt = str(tmp_path / "ckpt")
    Trainer(tiny_config(tmp_path / "resumed", training={**gpu, "train_iters": 3}, model=model,
                        checkpoint={"save": ckpt})).train()
    trainer = Trainer(tiny_config(tmp_path / "resumed", training=gpu, model=model, checkpoint={"save": ckpt, "load": ckpt}))
    assert all(group["fused"] for part in trainer.optimizer.chained_optimizers for group in part.optimizer.param_groups)
    trainer.train()
    resumed = [r["loss"] for r in read_records(trainer.config.logging.metrics_file)]
    assert resumed == pytest.approx(expected, rel=1e-3)
