"""The LR schedule of a resumed run: rebuilt for the new settings with a notice (default),
this run's always (--override-opt-param-scheduler), or the checkpoint's
(--use-checkpoint-opt_param-scheduler); never silently lr 0 for the new steps."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_gr.training.schedule_resume import restore_schedule
from megatron_gr.training.trainer import Trainer
from tests.unit.training.helpers import read_records, tiny_config

# Cosine decay over train_iters (lr_decay_iters unset), no warm-up.
SCHEDULE = {"lr_decay_iters": None, "lr_warmup_iters": 0, "lr": 3e-3, "min_lr": 0.0}


def _cosine(step: int, decay: int, lr: float = 3e-3) -> float:
    """megatron's cosine decay to min_lr 0: the rate after ``step`` optimizer steps."""
    return 0.0 if step > decay else 0.5 * lr * (math.cos(math.pi * step / decay) + 1.0)


def _lrs(config) -> list[float]:
    return [r["lr"] for r in read_records(config.logging.metrics_file)]


@pytest.fixture(scope="module")
def three_step_checkpoint(megatron_cpu, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schedule")
    ckpt = tmp / "ckpt"
    first = tiny_config(tmp / "first", training={**SCHEDULE, "train_iters": 3}, checkpoint={"save": str(ckpt)})
    Trainer(first).train()
    assert _lrs(first)[-1] == pytest.approx(0.0, abs=1e-12)  # the 3-step cosine has ended
    return ckpt


def _resume(tmp_path, ckpt, capsys, **checkpoint):
    config = tiny_config(tmp_path, training={**SCHEDULE, "train_iters": 6}, checkpoint={"load": str(ckpt), **checkpoint})
    capsys.readouterr()
    trainer = Trainer(config)
    notice = [line for line in capsys.readouterr().out.splitlines() if line.startswith("LR schedule")]
    assert trainer.state.iteration == 3
    trainer.train()
    return _lrs(config), notice


def test_longer_run_rebuilds_the_schedule_with_a_notice(three_step_checkpoint, tmp_path, capsys):
    lrs, notice = _resume(tmp_path, three_step_checkpoint, capsys)
    # The rate recorded after steps 4..6 is the 6-step cosine's, not the ended 3-step one's.
    assert lrs == pytest.approx([_cosine(step, 6) for step in (4, 5, 6)], rel=1e-12, abs=1e-15)
    assert min(lrs[:2]) > 1e-4
    assert len(notice) == 1 and "decay steps (lr_decay_iters, or train_iters) 3 -> 6" in notice[0]


def test_use_checkpoint_keeps_the_old_schedule(three_step_checkpoint, tmp_path, capsys):
    lrs, notice = _resume(tmp_path, three_step_checkpoint, capsys, use_checkpoint_opt_param_scheduler=True)
    assert lrs == [0.0, 0.0, 0.0]  # megatron: past the decay steps the rate is min_lr
    assert len(notice) == 1 and "keeping the checkpoint's" in notice[0] and "3 (this run: 6)" in notice[0]


def test_override_uses_this_runs_settings(three_step_checkpoint, tmp_path, capsys):
    lrs, notice = _resume(tmp_path, three_step_checkpoint, capsys, override_opt_param_scheduler=True)
    assert lrs == pytest.approx([_cosine(step, 6) for step in (4, 5, 6)], rel=1e-12, abs=1e-15)
    assert len(notice) == 1 and "--override-opt-param-scheduler" in notice[0]


def _scheduler(**settings) -> OptimizerParamScheduler:
    values = dict(init_lr=0.0, max_lr=1.0, min_lr=0.0, lr_warmup_steps=0, lr_decay_steps=10, lr_decay_style="linear",
                  start_wd=0.0, end_wd=0.0, wd_incr_steps=10, wd_incr_style="constant")
    values.update(settings)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return OptimizerParamScheduler(optimizer, **values)


def test_a_new_lr_or_decay_style_is_followed_and_named():
    saved = _scheduler()
    saved.step(increment=4)
    state = saved.state_dict()
    resumed = _scheduler(max_lr=2.0, lr_decay_style="cosine")
    notice = restore_schedule(resumed, state)
    assert "lr 1.0 -> 2.0" in notice and "decay style linear -> cosine" in notice
    assert resumed.num_steps == 4
    assert resumed.get_lr({"lr_mult": 1.0}) == pytest.approx(0.5 * 2.0 * (math.cos(math.pi * 4 / 10) + 1.0))


def test_same_settings_resume_silently():
    saved = _scheduler()
    saved.step(increment=4)
    resumed = _scheduler()
    assert restore_schedule(resumed, saved.state_dict()) is None
    assert resumed.get_lr({"lr_mult": 1.0}) == pytest.approx(0.6)
