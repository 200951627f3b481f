"""Loading into another model is one error line naming each differing field with both
values, raised before megatron reads a tensor; megatron's load is strict as a second line
of defence (a checkpoint without the saved config: older versions)."""

from __future__ import annotations

import shutil

import pytest

from megatron_gr.training.checkpoint_errors import CheckpointError
from megatron_gr.training.trainer import Trainer
from tests.unit.training.checkpoint_helpers import SHORT, assert_one_error_line, config_file, run_cli, saved_run, weights
from tests.unit.training.helpers import tiny_config


@pytest.fixture(scope="module")
def saved(megatron_cpu, tmp_path_factory):
    """A 2-step checkpoint of the tiny model (2 heads of width 8, relative bias, no mHC)."""
    return saved_run(tmp_path_factory.mktemp("compare"))


@pytest.mark.parametrize("model, sections, expected", [
    # 4 heads of width 4 fill tensors of the same shapes: it used to load silently.
    ({"num_attention_heads": 4, "qk_head_dim": 4, "v_head_dim": 4}, {},
     ["model.num_attention_heads=2 there, 4 in this run", "model.qk_head_dim=8 there, 4", "model.v_head_dim=8 there, 4"]),
    ({"relative_attention_bias": False}, {}, ["model.relative_attention_bias=True there, False in this run"]),
    ({"enable_hyper_connections": True}, {}, ["model.enable_hyper_connections=False there, True in this run"]),
    ({"hidden_size": 32}, {"embeddings": {"item": {"dim": 32}}}, ["model.hidden_size=16 there, 32 in this run"]),
    ({"num_layers": 1}, {}, ["model.num_layers=2 there, 1 in this run"]),
    ({"max_seq_len": 24}, {}, ["model.max_seq_len=20 there, 24 in this run"]),
    ({}, {"data": {"synthetic": {"num_users": 60, "num_items": 70, "mean_length": 12.0, "max_length": 40, "seed": 3}}},
     # the synthetic generator used 61 of 80 ids, 55 of 70
     ["items in the data set (dense ids of a plain item table) 61 there, 55 in this run",
      "item table rows 62 there, 56 in this run"]),
])
def test_another_model_is_refused_naming_the_fields(saved, tmp_path, capsys, model, sections, expected):
    path = config_file(tmp_path, training=SHORT, model=model, **sections)
    code, err, _ = run_cli(capsys, "pretrain", "--config", str(path), "--load", str(saved))
    assert_one_error_line(code, err, "holds another model", *expected)


def test_settings_that_may_change_load(saved, tmp_path):
    """Learning rate, steps, seed, dropout, logging: not part of the model."""
    config = tiny_config(
        tmp_path, model={"hidden_dropout": 0.0, "embedding_dropout": 0.1},
        training={"train_iters": 5, "lr": 1e-2, "seed": 7, "eval_interval": 3}, checkpoint={"load": str(saved)},
    )
    assert Trainer(config).state.iteration == 2


@pytest.fixture
def legacy(saved, tmp_path):
    """The checkpoint as an earlier version wrote it: no config or manifest in it."""
    copy = tmp_path / "legacy"
    shutil.copytree(saved, copy)
    for path in [copy / "config.yaml", *copy.glob("*/config.yaml"), *copy.glob("*/manifest.json")]:
        path.unlink()
    return copy


def test_strict_load_refuses_to_drop_tensors(legacy, tmp_path):
    config = tiny_config(tmp_path, training=SHORT, model={"relative_attention_bias": False}, checkpoint={"load": str(legacy)})
    with pytest.raises(CheckpointError, match=r"holds 2 tensors this model does not have \(decoder.layers.relative_bias"):
        Trainer(config)


def test_strict_load_refuses_missing_tensors(legacy, tmp_path):
    config = tiny_config(tmp_path, training=SHORT, model={"enable_hyper_connections": True}, checkpoint={"load": str(legacy)})
    with pytest.raises(CheckpointError, match=r"lacks 3 tensors this model has \(decoder.layers.hyper_connection"):
        Trainer(config)


def test_legacy_checkpoint_of_the_same_model_loads(legacy, saved, tmp_path, capsys):
    config = tiny_config(tmp_path, training=SHORT, checkpoint={"load": str(legacy)})
    capsys.readouterr()
    trainer = Trainer(config)
    assert "has no manifest.json (saved by an earlier version)" in capsys.readouterr().out
    assert trainer.state.iteration == 2
    reference = Trainer(tiny_config(tmp_path / "ref", training=SHORT, checkpoint={"load": str(saved)}))
    for key, value in weights(reference).items():
        assert (weights(trainer)[key] == value).all(), key


def _ultra_config(**click):
    import copy
    from pathlib import Path

    from megatron_gr.config.experiment import ExperimentConfig
    from megatron_gr.config.loader import load_yaml

    raw = copy.deepcopy(load_yaml(Path(__file__).parents[3] / "configs" / "ultra_hstu_synthetic.yaml"))
    channels = raw["model"]["transducers"]
    channels[1].update(click)
    return raw, ExperimentConfig.from_dict(raw)


def test_ultra_channels_of_another_order_or_head_split_are_refused(tmp_path):
    from megatron_gr.training.checkpoint_compare import check_same_model

    _, config = _ultra_config()
    saved = config.to_dict()  # what a checkpoint's config.yaml holds
    check_same_model(saved_config=saved, saved_facts=None, config=config, facts={}, where=tmp_path)
    # the same tensor shapes, another split of the click channel's 32 features into heads
    _, split = _ultra_config(num_attention_heads=4, qk_head_dim=8, v_head_dim=8)
    reordered_raw, _ = _ultra_config()
    reordered_raw["model"]["transducers"].reverse()
    for other in (split, _from_dict(reordered_raw)):
        with pytest.raises(CheckpointError) as error:
            check_same_model(saved_config=saved, saved_facts=None, config=other, facts={}, where=tmp_path)
        assert "model.transducers=" in str(error.value) and "\n" not in str(error.value)


def _from_dict(raw):
    from megatron_gr.config.experiment import ExperimentConfig

    return ExperimentConfig.from_dict(raw)
