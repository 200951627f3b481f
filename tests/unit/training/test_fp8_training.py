"""FP8 through the trainer and megatron's schedule, on the CPU (``torch._scaled_mm`` runs
there; the run plan refuses FP8 on a CPU, so these tests lift that one check): each FP8
linear casts its weight once per step however many micro-batches the step has (megatron's
``is_first_microbatch`` protocol) and evaluation casts afresh; the losses track
the float run's to FP8 precision."""

from __future__ import annotations

import pytest
import torch

from megatron_gr.training import plan
from megatron_gr.training.trainer import Trainer
from megatron_gr.transformer.fp8.linear import Fp8LinearState
from tests.unit.training.helpers import read_records, tiny_config

# FP8 GEMMs need layer sizes that are multiples of 16
MODEL = {"hidden_size": 32, "qk_head_dim": 16, "v_head_dim": 16, "hidden_dropout": 0.0, "embedding_dropout": 0.0}
TRAINING = {"train_iters": 3, "lr_decay_iters": 3, "lr_warmup_iters": 1, "global_batch_size": 24}  # 3 micro-batches


@pytest.fixture
def fp8_on_cpu(monkeypatch):
    monkeypatch.setattr(plan, "check_fp8_runnable", lambda config, device: None)


@pytest.fixture(autouse=True)
def _keep_global_rng():
    with torch.random.fork_rng():
        yield


def test_fp8_training_casts_weights_once_per_step_and_tracks_float(megatron_cpu, tmp_path, fp8_on_cpu, monkeypatch):
    float_run = tiny_config(tmp_path / "float", model=MODEL, training=TRAINING)
    Trainer(float_run).train()
    expected = [r["loss"] for r in read_records(float_run.logging.metrics_file)]

    casts = []
    original = Fp8LinearState.cast_weight
    monkeypatch.setattr(Fp8LinearState, "cast_weight", lambda self, weight: casts.append(self) or original(self, weight))
    fp8_run = tiny_config(tmp_path / "fp8", model={**MODEL, "fp8": "hybrid", "fp8_recipe": "delayed",
                                                   "fp8_amax_history_len": 4, "fp8_amax_compute_algo": "max"},
                          training=TRAINING)
    trainer = Trainer(fp8_run)
    linears = len({id(m.fp8_state) for m in trainer.model[0].modules() if hasattr(m, "fp8_state")})
    assert linears == 2 * 2  # UVQK and output projection of 2 layers
    casts_per_step = []
    launch_step = trainer.launch_step

    def counted_step():
        before = len(casts)
        previous = launch_step()
        casts_per_step.append(len(casts) - before)
        return previous

    trainer.launch_step = counted_step
    trainer.train()  # 3 steps of 3 micro-batches, then validation and the final evaluation
    assert casts_per_step == [linears] * 3
    assert len(casts) > 3 * linears  # evaluation casts the weights the last step updated
    losses = [r["loss"] for r in read_records(fp8_run.logging.metrics_file)]
    assert len(losses) == len(expected) == 3 and losses != expected  # FP8 rounding is in the path
    for fp8, plain in zip(losses, expected):
        # at this size (init std 0.02: small sublayer outputs beside the residual) 4e-6 apart
        assert abs(fp8 - plain) / plain < 1e-3, (losses, expected)
