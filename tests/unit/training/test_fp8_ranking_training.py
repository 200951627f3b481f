"""FP8 ranking models through the trainer and megatron's schedule, on the CPU
(``torch._scaled_mm`` runs there; the run plan refuses FP8 on a CPU, so these tests lift
that one check): DLRM-HSTU's STU linears and tower fusion layers cast their weights once
per step, record amaxes, and the loss tracks the float run's; ULTRA-HSTU's channels train
in FP8 (with the UVQK rematerialization); checkpoints load across FP8 and float runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_gr.config import ExperimentConfig
from megatron_gr.transformer.fp8.linear import Fp8LinearState
from megatron_gr.transformer.fp8.replicated_linear import Fp8Linear
from megatron_gr.training import plan
from megatron_gr.training.trainer import Trainer
from tests.unit.models.test_ultra_model import CLICK, IMP, SYNTHETIC
from tests.unit.training.helpers import read_records

# FP8 GEMMs need STU sizes that are multiples of 16; the tower's input (32 + 4 time
# features) is padded for its GEMM.
MODEL = {"type": "ranking", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "qk_head_dim": 16,
         "v_head_dim": 16, "max_seq_len": 24, "hidden_dropout": 0.0, "embedding_dropout": 0.0,
         "num_time_buckets": 32, "time_bucket_fn": "log"}
DELAYED = {"fp8": "hybrid", "fp8_recipe": "delayed", "fp8_amax_history_len": 4, "fp8_amax_compute_algo": "max"}
CHANNELS = [{"name": "imp"}, {"name": "click", "hidden_size": 16, "num_attention_heads": 1, "num_layers": 1}]
# the FP8 loss of each step within this relative distance of the float run's (measured:
# < 6e-4 at these sizes; a lost scale or a wrong operand is off by O(1))
LOSS_BAND = 3e-3


@pytest.fixture(autouse=True)
def fp8_on_cpu(monkeypatch):
    monkeypatch.setattr(plan, "check_fp8_runnable", lambda config, device: None)


@pytest.fixture(autouse=True)
def _keep_global_rng():
    with torch.random.fork_rng():
        yield


def config(tmp_path, *, model=None, features=None, save=None, load=None, train_iters=3, device="cpu") -> ExperimentConfig:
    """``device``: ``cuda`` trains in bf16 (precision auto), ``cpu`` in float32."""
    return ExperimentConfig.from_dict({
        "model": {**MODEL, **(model or {})},
        "embeddings": {"item": {"dim": 16}, "topic": {"dim": 16}, "segment": {"dim": 4}, "activity": {"dim": 4}},
        "ranking": {"action_encoder": {"watchtime_thresholds": [5.0], "dim": 4, "mlp_hidden": 8},
                    "content_encoder": {"mlp_hidden": 8}, "tower": {"hidden_sizes": [16]},
                    "output_postprocessor": "timestamp_layernorm", "features": features or {}},
        "data": {"ranking": {"synthetic": SYNTHETIC}},
        "training": {"train_iters": train_iters, "micro_batch_size": 4, "global_batch_size": 12, "lr": 3e-3,
                     "eval_interval": 0, "device": device, "eval_batch_size": 16, "lr_warmup_iters": 1},
        "checkpoint": {"save": str(save) if save else None, "load": str(load) if load else None},
        "logging": {"progress": "off", "metrics_file": str(tmp_path / "metrics.jsonl"), "log_interval": 1},
    })


def losses_of(run: ExperimentConfig) -> list[float]:
    return [r["loss"] for r in read_records(run.logging.metrics_file)]


def fp8_states(model) -> dict[int, Fp8LinearState]:
    return {id(m.fp8_state): m.fp8_state for m in model.modules() if hasattr(m, "fp8_state")}


def test_dlrm_hstu_fp8_casts_once_per_step_records_amaxes_and_tracks_float(megatron_cpu, tmp_path, monkeypatch):
    float_run = config(tmp_path / "float")
    Trainer(float_run).train()
    expected = losses_of(float_run)

    casts = []
    original = Fp8LinearState.cast_weight
    monkeypatch.setattr(Fp8LinearState, "cast_weight", lambda self, weight: casts.append(self) or original(self, weight))
    fp8_run = config(tmp_path / "fp8", model=DELAYED)
    trainer = Trainer(fp8_run)
    model = trainer.model[0]
    towers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert len(towers) == 1  # the fusion layer; the task heads stay in the model's precision
    linears = len(fp8_states(model))
    assert linears == 2 * 2 + 1  # UVQK and output projection of 2 STU layers, the fusion layer
    tower = towers[0].fp8_state
    casts_per_step, amaxes_per_step = [], []
    launch_step = trainer.launch_step

    def counted_step():
        before = len(casts)
        previous = launch_step()
        casts_per_step.append(len(casts) - before)
        amaxes_per_step.append((tower.input_history.records.item(), tower.grad_history.records.item()))
        return previous

    trainer.launch_step = counted_step
    results = trainer.train()  # 3 steps of 3 micro-batches, then the final evaluation
    assert casts_per_step == [linears] * 3
    # one amax per micro-batch (forward) and per backward pass, in the history of length 4
    assert amaxes_per_step == [(3, 3), (6, 6), (9, 9)]
    assert torch.all(tower.input_history.history > 0) and torch.all(tower.grad_history.history > 0)
    losses = losses_of(fp8_run)
    assert len(losses) == len(expected) == 3 and losses != expected  # FP8 rounding is in the path
    for fp8, plain in zip(losses, expected):
        assert abs(fp8 - plain) / plain < LOSS_BAND, (losses, expected)
    assert 0.0 < results["test"]["auc"] < 1.0


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_ultra_hstu_channels_train_in_fp8_with_uvqk_rematerialization(megatron_cpu, tmp_path, recipe):
    model = {"transducers": CHANNELS, "recompute_uvqk": True}
    float_run = config(tmp_path / "float", model=model, features={**IMP, **CLICK}, train_iters=2)
    Trainer(float_run).train()
    fp8_run = config(tmp_path / "fp8", model={**model, "fp8": "hybrid", "fp8_recipe": recipe},
                     features={**IMP, **CLICK}, train_iters=2)
    trainer = Trainer(fp8_run)
    assert len(fp8_states(trainer.model[0])) == 2 * 2 + 2 * 1 + 1  # imp: 2 layers, click: 1, the fusion layer
    trainer.train()
    losses, expected = losses_of(fp8_run), losses_of(float_run)
    assert np.all(np.isfinite(losses)) and losses != expected
    for fp8, plain in zip(losses, expected):
        assert abs(fp8 - plain) / plain < LOSS_BAND, (losses, expected)


def model_weights(trainer) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in trainer.model[0].state_dict().items() if isinstance(t, torch.Tensor)}


@pytest.mark.parametrize("direction", ["fp8_to_float", "float_to_fp8"])
def test_checkpoints_load_across_fp8(megatron_cpu, tmp_path, direction):
    source_model, target_model = (DELAYED, None) if direction == "fp8_to_float" else (None, DELAYED)
    source = Trainer(config(tmp_path / "a", model=source_model, save=tmp_path / "ckpt", train_iters=2))
    source.train()
    saved = model_weights(source)
    target = Trainer(config(tmp_path / "b", model=target_model, load=tmp_path / "ckpt", train_iters=3))
    assert target.state.iteration == 2
    loaded = model_weights(target)
    assert loaded.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name
    target.train()  # and the loaded model trains on
    assert np.isfinite(losses_of(target.config)[-1])
