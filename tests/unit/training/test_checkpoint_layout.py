"""What ``--load`` (and ``evaluate --load``) does with each kind of directory: a clear
notice and a fresh start, or one error line; never "starting from scratch" while loading
``best/`` weights, never evaluating random weights."""

from __future__ import annotations

import shutil

import pytest

from megatron_gr.training.checkpoint_errors import CheckpointError
from megatron_gr.training.checkpoint_layout import TRACKER, iteration_dir
from megatron_gr.training.trainer import Trainer
from tests.unit.training.checkpoint_helpers import assert_one_error_line, config_file, run_cli, weights
from tests.unit.training.helpers import tiny_config

TWO_SAVES = {"train_iters": 2, "lr_decay_iters": 2, "lr_warmup_iters": 0}


@pytest.fixture(scope="module")
def saved(megatron_cpu, tmp_path_factory):
    """Checkpoints of steps 1 and 2 and best/ (validated at step 2)."""
    return _saved(tmp_path_factory.mktemp("layout"))


def _saved(tmp):
    ckpt = tmp / "ckpt"
    Trainer(tiny_config(tmp / "run", training=TWO_SAVES, checkpoint={"save": str(ckpt), "save_interval": 1})).train()
    assert (ckpt / "best").is_dir() and iteration_dir(ckpt, 1).is_dir()
    return ckpt


@pytest.fixture
def copy(saved, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(saved, target)
    return target


def _notices(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_missing_path_starts_fresh_with_a_notice(megatron_cpu, tmp_path, capsys):
    capsys.readouterr()
    trainer = Trainer(tiny_config(tmp_path, training=TWO_SAVES, checkpoint={"load": str(tmp_path / "nothing")}))
    assert trainer.state.iteration == 0
    assert f"checkpoint.load={tmp_path / 'nothing'} does not exist: starting from scratch" in _notices(capsys)


def test_load_of_a_file_is_an_error(megatron_cpu, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    path = config_file(tmp_path, training=TWO_SAVES)
    code, err, _ = run_cli(capsys, "pretrain", "--config", str(path), "--load", str(tmp_path / "file"))
    assert_one_error_line(code, err, f"checkpoint.load={tmp_path / 'file'} is a file")


def test_best_without_tracker_is_a_fresh_start_that_says_so(copy, tmp_path, capsys):
    """best/ alone is not a checkpoint to resume: the run starts from its own initial
    weights, and says that best/ is not loaded."""
    (copy / TRACKER).unlink()
    for step in (1, 2):
        shutil.rmtree(iteration_dir(copy, step))
    capsys.readouterr()
    trainer = Trainer(tiny_config(tmp_path / "a", training=TWO_SAVES, checkpoint={"load": str(copy)}))
    notices = _notices(capsys)
    assert any("only best/: starting from scratch" in n and "best/ is not loaded" in n for n in notices), notices
    assert trainer.state.iteration == 0 and trainer.best_weights is None
    fresh = Trainer(tiny_config(tmp_path / "b", training=TWO_SAVES))
    for key, value in weights(fresh).items():
        assert (weights(trainer)[key] == value).all(), key


def test_checkpoints_without_tracker_are_an_error(copy, tmp_path):
    (copy / TRACKER).unlink()
    with pytest.raises(CheckpointError, match=rf"holds checkpoints \(steps 1, 2\) but no {TRACKER}: .*--ckpt-step 2"):
        Trainer(tiny_config(tmp_path, training=TWO_SAVES, checkpoint={"load": str(copy)}))


def test_tracker_naming_a_missing_step(copy, tmp_path):
    shutil.rmtree(iteration_dir(copy, 2))
    with pytest.raises(CheckpointError, match=r"names step 2 but .*iter_0000002 does not exist; the previous complete checkpoint is step 1"):
        Trainer(tiny_config(tmp_path, training=TWO_SAVES, checkpoint={"load": str(copy)}))


def test_ckpt_step_that_was_not_saved(copy, tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint.ckpt_step=5: .* does not exist; saved steps in .*: 1, 2"):
        Trainer(tiny_config(tmp_path, training=TWO_SAVES, checkpoint={"load": str(copy), "ckpt_step": 5}))


@pytest.mark.parametrize("what", ["missing", "empty", "file"])
def test_evaluate_needs_saved_weights(megatron_cpu, tmp_path, capsys, what):
    target = tmp_path / "target"
    if what == "empty":
        target.mkdir()
    if what == "file":
        target.write_text("x")
    path = config_file(tmp_path, training=TWO_SAVES)
    code, err, out = run_cli(capsys, "evaluate", "--config", str(path), "--load", str(target))
    words = {"missing": "does not exist", "empty": "holds no weights to evaluate", "file": "is a file"}[what]
    assert_one_error_line(code, err, words)
    assert "final" not in out


def test_evaluate_of_best_only(copy, tmp_path, capsys):
    (copy / TRACKER).unlink()
    for step in (1, 2):
        shutil.rmtree(iteration_dir(copy, step))
    path = config_file(tmp_path, training=TWO_SAVES)
    code, err, out = run_cli(capsys, "evaluate", "--config", str(path), "--load", str(copy))
    assert code == 0, err
    assert "(best validation weights, step 2)" in out and "final (weights of step 2" in out
