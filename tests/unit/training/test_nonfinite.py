"""NaN and Inf in training: a non-finite loss or gradient norm skips the step (nothing moves,
the LR schedule waits), skipped steps are logged and counted, too many in a row stop the run
with one line, ranks decide together, and a NaN metric never selects weights."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from megatron_gr.models import hstu_retrieval
from megatron_gr.training.nonfinite import NonFiniteGuard, TrainingDivergedError, is_better
from megatron_gr.training.trainer import Trainer
from tests.unit.training.helpers import tiny_config
from tests.unit.training.nonfinite_worker import any_rank_worker

NAN = float("nan")


class RecordingLog:
    """The part of ``RunLogger`` the guard uses."""

    def __init__(self):
        self.records, self.lines, self.closed = [], [], False

    def train(self, step, record):
        self.records.append((step, dict(record)))

    def info(self, message):
        self.lines.append(message)

    def close(self):
        self.closed = True


def _record(skipped: bool, loss: float = 1.0) -> dict:
    return {"loss": NAN if skipped else loss, "grad_norm": NAN if skipped else 2.0, "skipped": skipped}


def test_the_guard_counts_logs_and_stops_after_n_in_a_row():
    guard, log = NonFiniteGuard(3), RecordingLog()
    pattern = [False, True, True, False, True, True]
    for step, skipped in enumerate(pattern, start=1):
        assert guard.observe(step, _record(skipped), log) is skipped
    assert [step for step, _ in log.records] == [2, 3, 5, 6]  # every skipped step is written
    assert [r["skipped_steps"] for _, r in log.records] == [1, 2, 3, 4]
    assert log.lines[-1] == "step 6 skipped: loss nan, gradient norm nan; no weight moved (2 in a row, 4 in all)"
    with pytest.raises(TrainingDivergedError) as caught:
        guard.observe(7, _record(True), log)
    message = str(caught.value)
    assert "\n" not in message and log.closed
    assert message.startswith("training stopped at step 7: 3 steps in a row had a NaN or infinite loss")
    assert "training.max_nonfinite_steps=3" in message


def test_zero_never_stops():
    guard, log = NonFiniteGuard(0), RecordingLog()
    for step in range(1, 50):
        assert guard.observe(step, _record(True), log)
    assert guard.total == 49 and not log.closed


def test_a_non_finite_metric_is_never_better():
    assert is_better(0.1, None) and is_better(0.2, 0.1) and not is_better(0.1, 0.1)
    for bad in (NAN, float("inf"), -float("inf")):
        assert not is_better(bad, None) and not is_better(bad, 0.1)


def _poison(monkeypatch, trainer, where: dict):
    """Makes the model's loss (``where["loss"]``) or only its gradient (``where["grad"]``)
    NaN on the steps listed there."""
    real = hstu_retrieval.sampled_softmax_loss

    def loss(user, *args, **kwargs):
        step = trainer.state.iteration + 1
        if step in where.get("grad", ()):
            user.register_hook(lambda grad: torch.full_like(grad, NAN))
        out = real(user, *args, **kwargs)
        return out * NAN if step in where.get("loss", ()) else out

    monkeypatch.setattr(hstu_retrieval, "sampled_softmax_loss", loss)


def _weights(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model[0].parameters()]


def _moved(trainer, before) -> list[bool]:
    return [not torch.equal(p.detach(), b) for p, b in zip(trainer.model[0].parameters(), before)]


def test_a_non_finite_step_moves_nothing_and_the_next_one_trains(megatron_cpu, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path, training={"clip_grad": 0.0, "lr_warmup_iters": 0}))
    _poison(monkeypatch, trainer, {"loss": {2}, "grad": {4}})
    steps = []
    for step in range(1, 5):
        before, scheduled = _weights(trainer), trainer.scheduler.num_steps
        record = trainer.train_step()
        trainer.state.iteration = step
        steps.append((record, _moved(trainer, before), trainer.scheduler.num_steps - scheduled))
    for step, (record, moved, scheduled) in enumerate(steps, start=1):
        if step in (2, 4):
            assert record["skipped"] and not any(moved) and scheduled == 0, step
            assert math.isnan(record["grad_norm"])
        else:
            assert not record["skipped"] and any(moved) and scheduled == 1, step
            assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
    assert math.isnan(steps[1][0]["loss"])  # step 2: the loss itself
    assert math.isfinite(steps[3][0]["loss"])  # step 4: only the gradient


def test_a_nan_metric_never_becomes_the_best(megatron_cpu, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    trainer = Trainer(tiny_config(tmp_path, checkpoint={"save": str(ckpt)}))
    metrics = {"hr@10": NAN, "ndcg@10": NAN, "hr@50": NAN, "ndcg@50": NAN, "mrr": NAN}
    monkeypatch.setattr(trainer, "evaluate", lambda which: dict(metrics))
    trainer.validate()
    assert trainer.state.best_metric is None and trainer.best_weights is None
    assert not (ckpt / "best").exists()
    metrics.update({"ndcg@10": 0.05})
    trainer.validate()
    assert trainer.state.best_metric == 0.05 and (ckpt / "best").is_dir()
    metrics.update({"ndcg@10": NAN})
    trainer.validate()
    assert trainer.state.best_metric == 0.05 and trainer.state.evals_since_best == 1


def test_a_diverging_run_stops_with_one_line(tmp_path):
    """The issue's case: ``--lr 1e6 --clip-grad 0`` makes the loss NaN from step 2; the run
    skips those steps and stops after training.max_nonfinite_steps of them, saving nothing as
    best."""
    metrics, ckpt = tmp_path / "metrics.jsonl", tmp_path / "ckpt"
    result = subprocess.run(
        [sys.executable, "-m", "megatron_gr.cli", "pretrain", "--cpu", "--lr", "1e6", "--clip-grad", "0",
         "--train-iters", "20", "--eval-interval", "0", "--micro-batch-size", "16", "--progress", "off",
         "--log-interval", "100", "--metrics-file", str(metrics), "--save", str(ckpt),
         "--set", "data.synthetic.num_users=100", "--set", "data.synthetic.num_items=200",
         "--set", "training.max_nonfinite_steps=3"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: training stopped at step ")
    assert "3 steps in a row" in result.stderr
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert records[-3:] == [r for r in records if r["skipped"]]  # the last three, nothing after
    assert [r["step"] for r in records[-3:]] == list(range(records[-3]["step"], records[-3]["step"] + 3))
    assert [r["skipped_steps"] for r in records[-3:]] == [1, 2, 3]
    assert all(math.isnan(r["loss"]) for r in records[-3:])
    assert not (ckpt / "best").exists() and not list(ckpt.glob("iter_*"))


def test_ranks_decide_together(tmp_path):
    """Only rank 1 sees a non-finite value: both ranks skip; when none does, neither skips."""
    init_file = str(tmp_path / "init")
    mp.spawn(any_rank_worker, args=(init_file, [False, True]), nprocs=2)
    assert [torch.load(f"{init_file}.{rank}") for rank in range(2)] == [[True, False], [True, False]]
