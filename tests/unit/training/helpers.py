"""Small experiment configs for training tests, and the dynamic-table run that a multi-rank
test starts on every rank."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_gr.config import ExperimentConfig


def tiny_config(tmp_path: Path, **sections) -> ExperimentConfig:
    raw = {
        "model": {"num_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "qk_head_dim": 8,
                  "v_head_dim": 8, "max_seq_len": 20, "hidden_dropout": 0.2, "embedding_dropout": 0.2,
                  "num_negatives": 16, "num_in_batch_negatives": 8},
        "data": {"synthetic": {"num_users": 60, "num_items": 80, "mean_length": 12.0, "max_length": 40, "seed": 3}},
        "training": {"train_iters": 6, "micro_batch_size": 8, "global_batch_size": 16, "lr": 3e-3,
                     "lr_warmup_iters": 2, "lr_decay_iters": 6, "eval_interval": 0, "device": "cpu",
                     "eval_batch_size": 32},
        "logging": {"log_interval": 1, "progress": "off", "metrics_file": str(tmp_path / "metrics.jsonl")},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return ExperimentConfig.from_dict(raw)


def read_records(path: Path, kind: str = "train") -> list[dict]:
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    if kind == "train":
        return [r for r in records if "loss" in r]
    return [r for r in records if r.get("split") == kind]


def dynamic_training_config(workdir: Path, world: int) -> ExperimentConfig:
    """A tiny HSTU run on synthetic raw ids (up to 2^40) through a dynamic item table,
    without dropout, with the default micro-batch balancing: ``auto`` cuts the global batch
    by attention cost on 2 ranks and in stream order on 1, which must not change the
    objective (negatives are drawn per global batch)."""
    return tiny_config(
        workdir / f"run{world}",
        model={"hidden_dropout": 0.0, "embedding_dropout": 0.0},
        embeddings={"item": {"type": "dynamic", "dynamic": {"capacity": 512, "bucket_size": 16}}},
        training={"train_iters": 4, "lr_decay_iters": 4, "eval_interval": 2},
    )


def train_dynamic(workdir: Path) -> None:
    """On every rank of a multi-rank run: the trainer on this world size (data parallel);
    rank 0 writes the metrics."""
    import torch.distributed as dist

    from megatron_gr.training.trainer import Trainer

    Trainer(dynamic_training_config(Path(workdir), dist.get_world_size())).train()
