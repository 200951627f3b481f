"""The step decided on the device trains as the step decided on the host: the same
clipped updates (to rounding), the same skipped steps (nothing moves, the LR schedule waits), the
same records;
and the training loop, which reads each step's outcome during the next step, logs what
reading every step at its end gives."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_gr.training.step_verdict import DeviceVerdict, HostVerdict
from megatron_gr.training.trainer import Trainer
from tests.unit.training.helpers import read_records, tiny_config
from tests.unit.training.test_nonfinite import _poison

# Clipping bites (the norms of these steps are far above 0.05); warm-up makes every step's
# LR differ, so a schedule that advanced on a skipped step shows in the records.
TRAINING = {"clip_grad": 0.05, "lr_warmup_iters": 3, "train_iters": 6, "lr_decay_iters": 6}
POISON = {"loss": {2}, "grad": {4}}  # step 2: the loss is NaN; step 4: only the gradients


DYNAMIC = {"item": {"type": "dynamic", "dynamic": {"capacity": 512, "bucket_size": 16}}}


def _run(tmp_path, monkeypatch, *, on_host: bool, embeddings: dict) -> tuple[list[dict], list[torch.Tensor], Trainer]:
    trainer = Trainer(tiny_config(tmp_path, training=TRAINING, embeddings=embeddings))
    assert isinstance(trainer.verdict, DeviceVerdict)
    if on_host:
        trainer.verdict = HostVerdict(trainer.sparse)
    _poison(monkeypatch, trainer, POISON)
    records = []
    for step in range(1, 7):
        records.append(trainer.train_step())
        trainer.state.iteration = step
    weights = [p.detach().double().clone() for p in trainer.model[0].parameters()]
    for table in trainer.sparse.tables:  # the rows and their Adam moments
        weights += [table.weights.double().clone()] + [state.double().clone() for state in table.states]
    return records, weights, trainer


@pytest.mark.parametrize("table", ["plain", "dynamic"])
def test_device_and_host_verdicts_train_alike(megatron_cpu, tmp_path, monkeypatch, table):
    embeddings = DYNAMIC if table == "dynamic" else {}
    device, device_weights, on_device = _run(tmp_path / "device", monkeypatch, on_host=False, embeddings=embeddings)
    host, host_weights, on_host = _run(tmp_path / "host", monkeypatch, on_host=True, embeddings=embeddings)
    assert [r["skipped"] for r in device] == [r["skipped"] for r in host] == [False, True, False, True, False, False]
    assert on_device.scheduler.num_steps == on_host.scheduler.num_steps == 4
    assert [t.step for t in on_device.sparse.tables] == [t.step for t in on_host.sparse.tables] == [4] * len(embeddings)
    assert [r["lr"] for r in device] == [r["lr"] for r in host]
    # a record's LR is the next step's (as megatron logs it): the schedule waited at 2 and 4
    assert device[0]["lr"] == device[1]["lr"] and device[2]["lr"] == device[3]["lr"]
    assert len({r["lr"] for r in device}) == 4
    # The same operations as megatron's on the host, in float64 where it uses Python floats;
    # only its root is Python's pow(x, 0.5) there and a square root here (an ulp apart at
    # times), which can move the float32 clip factor by an ulp: so not compared bit for bit.
    for d, h in zip(device, host):
        assert d["tokens"] == h["tokens"] > 0
        for key in ("loss", "grad_norm"):
            if math.isnan(h[key]):
                assert math.isnan(d[key]), key
            else:
                assert d[key] == pytest.approx(h[key], rel=1e-9), key
    assert any(r["grad_norm"] > 10 * TRAINING["clip_grad"] for r in host if not r["skipped"])  # clipping did bite
    assert len(device_weights) == len(host_weights)
    for d, h in zip(device_weights, host_weights):
        assert (d - h).norm() <= 1e-7 * h.norm() + 1e-12


def test_a_skipped_step_moves_nothing_on_the_device(megatron_cpu, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path, training=TRAINING))
    _poison(monkeypatch, trainer, {"grad": {2}})
    trainer.train_step()
    trainer.state.iteration = 1
    before = [p.detach().clone() for p in trainer.model[0].parameters()]
    steps_before = _adam_step_counts(trainer)
    record = trainer.train_step()
    assert record["skipped"] and math.isnan(record["grad_norm"]) and math.isfinite(record["loss"])
    assert all(torch.equal(p.detach(), b) for p, b in zip(trainer.model[0].parameters(), before))
    assert steps_before and _adam_step_counts(trainer) == steps_before  # fused Adam put its counts back
    trainer.state.iteration = 2
    assert not trainer.train_step()["skipped"]
    assert _adam_step_counts(trainer) == [count + 1 for count in steps_before]


def _adam_step_counts(trainer) -> list[float]:
    parts = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    return [float(state["step"]) for part in parts for state in part.optimizer.state.values()]


def test_the_loop_reading_a_step_late_logs_what_reading_at_once_gives(megatron_cpu, tmp_path, monkeypatch):
    at_once = Trainer(tiny_config(tmp_path / "at_once", training=TRAINING))
    _poison(monkeypatch, at_once, POISON)
    expected = []
    for step in range(1, 7):
        expected.append(at_once.train_step())
        at_once.state.iteration = step
    config = tiny_config(tmp_path / "loop", training=TRAINING)
    looped = Trainer(config)
    _poison(monkeypatch, looped, POISON)
    settled_during_launch = []
    launch = looped.launch_step

    def counted_launch():
        previous = launch()
        settled_during_launch.append(previous is not None)
        return previous

    looped.launch_step = counted_launch
    looped.train()
    assert settled_during_launch == [False] + [True] * 5  # each step read while the next ran
    logged = read_records(config.logging.metrics_file)
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    for record, want in zip(logged, expected):
        assert record["skipped"] == want["skipped"] and record["lr"] == want["lr"]
        assert record["tokens"] == want["tokens"]
        for key in ("loss", "grad_norm"):
            assert (math.isnan(record[key]) and math.isnan(want[key])) or record[key] == want[key], key
    assert looped.scheduler.num_steps == at_once.scheduler.num_steps == 4


def test_the_loop_reads_a_step_before_what_needs_its_weights(megatron_cpu, tmp_path):
    """Validation and checkpoints see the step's weights and its LR schedule: the step is
    read before them, not during the next one."""
    config = tiny_config(tmp_path, training={**TRAINING, "eval_interval": 2})
    trainer = Trainer(config)
    in_flight_at_validation = []
    validate = trainer.validate

    def checked_validate():
        in_flight_at_validation.append(trainer._in_flight is not None)
        return validate()

    trainer.validate = checked_validate
    trainer.train()
    assert in_flight_at_validation == [False, False, False]  # steps 2, 4 and 6


def test_sgd_decides_on_the_host(megatron_cpu, tmp_path):
    sgd = Trainer(tiny_config(tmp_path / "sgd", training={"optimizer": "sgd"},
                              parallel={"use_distributed_optimizer": False}))
    assert isinstance(sgd.verdict, HostVerdict) and not sgd.verdict.defers
    record = sgd.train_step()
    assert math.isfinite(record["loss"]) and not record["skipped"]


def test_the_loop_logs_each_steps_own_table_counters(megatron_cpu, tmp_path, monkeypatch):
    """Read a step late, a logged step still reports the dynamic table's counters at its
    own end (not after the next step's lookups): at the log interval, and for a skipped step
    off it (without the stored rows there, which are counted only for steps at the interval)."""
    poison = {"loss": {3}}
    reference = Trainer(tiny_config(tmp_path / "reference", training=TRAINING, embeddings=DYNAMIC))
    _poison(monkeypatch, reference, poison)
    expected = {}
    for step in range(1, 7):
        reference.train_step()
        reference.state.iteration = step
        expected[step] = reference.sparse.statistics()
    config = tiny_config(tmp_path / "loop", training=TRAINING, embeddings=DYNAMIC, logging={"log_interval": 2})
    looped = Trainer(config)
    _poison(monkeypatch, looped, poison)
    looped.train()
    logged = {r["step"]: r for r in read_records(config.logging.metrics_file)}
    assert sorted(logged) == [2, 3, 4, 6] and logged[3]["skipped"]
    for step, record in logged.items():
        counters = {key: value for key, value in record.items() if key.startswith("embedding/")}
        if step == 3:
            expected[3] = {k: v for k, v in expected[3].items() if not k.endswith(("/occupancy", "/load_factor"))}
        assert counters == expected[step], step
    assert expected[2]["embedding/item/lookups"] < expected[4]["embedding/item/lookups"]
