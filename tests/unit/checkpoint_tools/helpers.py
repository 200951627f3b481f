"""Checkpoints for the checkpoint-tool tests, and every tensor of a checkpoint read back."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_gr.checkpoint_tools import offline_process_group, open_checkpoint
from megatron_gr.checkpoint_tools.source import read_entries
from megatron_gr.embeddings.dynamic.checkpoint import read_saved_table
from megatron_gr.training.trainer import Trainer
from tests.unit.training.helpers import tiny_config

# No dropout: resumed runs are compared step by step.
NO_DROPOUT = {"hidden_dropout": 0.0, "embedding_dropout": 0.0}
DYNAMIC = {"item": {"type": "dynamic", "dynamic": {"capacity": 512, "bucket_size": 16}}}


def train_and_save(tmp_path: Path, name: str, *, steps: int = 3, total: int = 5, **sections) -> Path:
    """A tiny run saved at ``steps`` (of ``total``); returns its save directory."""
    save = tmp_path / name
    training = {"train_iters": steps, "lr_decay_iters": total, "lr_warmup_iters": 1, "eval_interval": 0}
    config = tiny_config(tmp_path / f"{name}-log", model=NO_DROPOUT, training=training,
                         checkpoint={"save": str(save), "keep_best": False}, **sections)
    Trainer(config).train()
    return save


def loaded_trainer(tmp_path: Path, load: Path, name: str, *, total: int = 5, **sections) -> Trainer:
    """A trainer (of ``total`` steps) that loaded ``load``."""
    training = {"train_iters": total, "lr_decay_iters": 5, "lr_warmup_iters": 1, "eval_interval": 0}
    config = tiny_config(tmp_path / f"{name}-log", model=NO_DROPOUT, training=training, checkpoint={"load": str(load)}, **sections)
    return Trainer(config)


def resume_losses(tmp_path: Path, load: Path, name: str, *, total: int = 5, **sections) -> tuple[Trainer, list[float]]:
    """Resumes ``load`` and trains to ``total``; the trainer and the losses of its steps."""
    trainer = loaded_trainer(tmp_path, load, name, total=total, **sections)
    start, losses = trainer.state.iteration, []
    for _ in range(start, total):
        losses.append(trainer.train_step()["loss"])
        trainer.state.iteration += 1
    return trainer, losses


def all_entries(path: Path) -> dict:
    """Every tensor and object of a checkpoint by key (full shapes), its common state
    (``__common__``) and its dynamic tables' rows sorted by id (``__dynamic__``)."""
    checkpoint = open_checkpoint(path)
    with offline_process_group():
        entries = read_entries(checkpoint, list(checkpoint.tensors) + checkpoint.objects)
    tables = {}
    for name in checkpoint.dynamic_tables:
        state = read_saved_table(checkpoint.directory, name)
        order = torch.argsort(state["rows"]["keys"])
        tables[name] = {section: {field: values[order] for field, values in state[section].items()}
                        for section in ("rows", "optimizer") if section in state}
    return {**entries, "__common__": checkpoint.common, "__dynamic__": tables}


def assert_equal_tensors(actual: dict, expected: dict, keys) -> None:
    for key in keys:
        assert actual[key].dtype == expected[key].dtype, key
        assert torch.equal(actual[key], expected[key]), key
