"""A ranking checkpoint loads only into the same ranking model: the encoders', the tower's
and the tasks' shapes, the tables and their rows are compared before megatron reads a
tensor (one line naming each differing field); the settings that do not shape the
weights (task weights, tower dropout) may change."""

from __future__ import annotations

import pytest

from megatron_gr.config import ExperimentConfig
from megatron_gr.training.checkpoint_errors import CheckpointError
from megatron_gr.training.trainer import Trainer
from tests.unit.models.test_ranking_model import SYNTHETIC

TASKS = [{"name": "click", "type": "binary", "label": "cand_action", "bitmask": 1},
         {"name": "watch_time", "type": "regression", "label": "cand_watch_time"}]


def config(tmp_path, *, save=None, load=None, tower=None, tasks=TASKS, data=None) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "model": {"type": "ranking", "num_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "qk_head_dim": 8,
                  "v_head_dim": 8, "max_seq_len": 24, "num_time_buckets": 32, "time_bucket_fn": "log"},
        "embeddings": {"item": {"dim": 8}, "topic": {"dim": 8}, "segment": {"dim": 4}, "activity": {"dim": 4}},
        "ranking": {"tower": tower or {"hidden_sizes": [8]}, "tasks": tasks},
        "data": {"ranking": {"synthetic": data or SYNTHETIC}},
        "training": {"train_iters": 1, "micro_batch_size": 8, "lr": 1e-3, "eval_interval": 0, "device": "cpu"},
        "checkpoint": {"save": str(save) if save else None, "load": str(load) if load else None},
        "logging": {"progress": "off"},
    })


@pytest.fixture(scope="module")
def saved(megatron_cpu, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranking_ckpt")
    Trainer(config(tmp, save=tmp / "ckpt")).train()
    return tmp / "ckpt"


@pytest.mark.parametrize("changes, expected", [
    ({"tower": {"hidden_sizes": [16]}}, ["ranking.tower.hidden_sizes=[8] there, [16] in this run"]),
    ({"tasks": [TASKS[0], {**TASKS[1], "name": "watch"}]}, ["ranking.tasks=", "'name': 'watch'"]),
    ({"data": {**SYNTHETIC, "num_items": 20}}, ["rows of the plain tables"]),
])
def test_another_ranking_model_is_refused_naming_the_fields(saved, tmp_path, changes, expected):
    with pytest.raises(CheckpointError) as caught:
        Trainer(config(tmp_path, load=saved, **changes))
    message = str(caught.value)
    assert "\n" not in message and "holds another model" in message
    for words in expected:
        assert words in message, message


def test_task_weights_and_tower_dropout_may_change(saved, tmp_path):
    tasks = [{**TASKS[0], "weight": 2.0}, TASKS[1]]
    trainer = Trainer(config(tmp_path, load=saved, tasks=tasks, tower={"hidden_sizes": [8], "dropout": 0.1}))
    assert trainer.state.iteration == 1
