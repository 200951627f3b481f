"""The objective of a step does not depend on how its global batch is cut into
micro-batches: one rank, dropout on (0.2 / 0.2), a global batch of 16 users cut into 2 x 8
in stream order, 4 x 4 by attention cost, and 1 x 16, trains the same model (losses and
weights equal up to the order of floating-point sums). Before negatives were drawn per
global batch and dropout masks keyed, each cut drew its own negatives and masks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_gr.training.trainer import Trainer
from tests.unit.training.helpers import read_records, tiny_config

CUTS = {"2x8 stream order": (8, "none"), "4x4 attention cost": (4, "attention_cost"), "1x16": (16, "none")}


def train(tmp_path, name: str) -> tuple[list[float], dict]:
    micro_batch_size, balance = CUTS[name]
    config = tiny_config(tmp_path / name.replace(" ", "_"), parallel={"micro_batch_balance": balance},
                         training={"train_iters": 3, "micro_batch_size": micro_batch_size})
    assert config.model.hidden_dropout == config.model.embedding_dropout == 0.2
    trainer = Trainer(config)
    trainer.train()
    weights = {k: v.detach().clone() for k, v in trainer.model[0].module.state_dict().items() if torch.is_tensor(v)}
    return [r["loss"] for r in read_records(config.logging.metrics_file)], weights


def test_any_cut_of_the_global_batch_trains_the_same_model(megatron_cpu, tmp_path):
    runs = {name: train(tmp_path, name) for name in CUTS}
    losses, weights = runs["2x8 stream order"]
    for name, (other_losses, other_weights) in runs.items():
        assert other_losses == pytest.approx(losses, rel=1e-6), name
        for key, value in weights.items():
            error = float((other_weights[key] - value).abs().max())
            assert error <= 1e-6 * max(1.0, float(value.abs().max())), f"{name}: {key} differs by {error:.2e}"


def test_a_training_batch_without_the_step_draws_is_refused(megatron_cpu, tmp_path):
    """The model never samples: a training batch (labels) must carry its step's negatives
    and its tokens' dropout keys."""
    trainer = Trainer(tiny_config(tmp_path))
    batch = trainer.loader.next_step()[0]
    model = trainer.model[0].module
    for missing in ("negative_ids", "token_keys"):
        with pytest.raises(ValueError, match="a training batch needs negative_ids and token_keys"):
            model(dataclasses.replace(batch, **{missing: None}))
