"""Hyper-connection settings: every guard names the key, the value and the fix; the flags
and ``recompute_modules: [mhc]`` reach the model config past megatron's own validation."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_gr.cli import main
from megatron_gr.config import ConfigError, ExperimentConfig, GRTransformerConfig
from megatron_gr.training.model_setup import runtime_model_config
from megatron_gr.training.runtime import Runtime

MHC = {"enable_hyper_connections": True}
MHC_RECOMPUTE = {**MHC, "recompute_granularity": "selective", "recompute_modules": ["mhc"]}

BAD_MODELS = [
    ({**MHC, "num_residual_streams": 1}, ["model.num_residual_streams=1", ">= 2"]),
    ({"num_residual_streams": 0}, ["model.num_residual_streams=0", ">= 1"]),
    ({**MHC, "num_residual_streams": 2.5}, ["model.num_residual_streams=2.5", "integer"]),
    ({**MHC, "mhc_sinkhorn_iterations": 0}, ["model.mhc_sinkhorn_iterations=0", ">= 1"]),
    ({**MHC, "mhc_init_gating_factor": -0.1}, ["model.mhc_init_gating_factor=-0.1", ">= 0.0"]),
    ({**MHC_RECOMPUTE, "mhc_recompute_layer_num": 0}, ["model.mhc_recompute_layer_num=0", ">= 1"]),
    ({**MHC_RECOMPUTE, "mhc_recompute_layer_num": True}, ["model.mhc_recompute_layer_num=True", "integer"]),
    ({**MHC, "mhc_recompute_layer_num": 2}, ["mhc_recompute_layer_num=2", "has no effect", "recompute_modules"]),
    ({"use_fused_mhc": True}, ["use_fused_mhc=True", "no effect", "enable_hyper_connections=False"]),
    ({**MHC, "recompute_modules": ["mhc"]}, ["recompute_granularity=None", "'selective'"]),
    ({"recompute_granularity": "selective", "recompute_modules": ["mhc"]}, ["enable_hyper_connections=False", "'mhc'"]),
    ({**MHC_RECOMPUTE, "recompute_modules": ["mhc", "layernorm"]}, ["'layernorm'", "use 'mhc'"]),
    ({**MHC_RECOMPUTE, "recompute_modules": ["mhc", "mlp"]}, ["'mlp'", "use 'mhc'"]),
    ({**MHC_RECOMPUTE, "recompute_modules": ["mhc", "attn"]}, ["recompute_modules", "'attn'"]),
    ({**MHC, "recompute_modules": "mhc"}, ["model.recompute_modules='mhc'", "must be a list"]),
    ({**MHC, "recompute_modules": ["mhc", 3]}, ["model.recompute_modules[1]=3", "string"]),
]


@pytest.mark.parametrize("model, words", BAD_MODELS, ids=[str(i) for i in range(len(BAD_MODELS))])
def test_bad_mhc_setting_is_a_clear_error(model, words):
    with pytest.raises(ConfigError) as caught:
        ExperimentConfig.from_dict({"model": model})
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


@pytest.mark.parametrize(
    "field, value",
    [("virtual_pipeline_model_parallel_size", 2), ("num_moe_experts", 4), ("cuda_graph_impl", "local"),
     ("cpu_offloading", True)],
)
def test_unsupported_combinations_are_rejected(field, value):
    pipeline = {"pipeline_model_parallel_size": 2, "pipeline_dtype": torch.float32}
    extra = pipeline if field == "virtual_pipeline_model_parallel_size" else {}
    with pytest.raises(ConfigError, match=f"{field}=.*not supported with enable_hyper_connections=True"):
        GRTransformerConfig(num_layers=4, hidden_size=16, num_attention_heads=2, enable_hyper_connections=True,
                            **{field: value}, **extra)


def test_pipeline_parallelism_is_accepted():
    config = ExperimentConfig.from_dict({"model": {**MHC_RECOMPUTE, "num_layers": 4},
                                         "parallel": {"pipeline_model_parallel_size": 2}})
    assert config.model.enable_hyper_connections and config.parallel.pipeline_model_parallel_size == 2


def test_context_parallelism_is_accepted():
    """Hyper-connections mix streams token by token: splitting sequences over ranks changes
    nothing for them (tests/unit/parallel/test_mhc_multi_rank.py runs CP = 2)."""
    config = GRTransformerConfig(num_layers=4, hidden_size=16, num_attention_heads=2, enable_hyper_connections=True,
                                 context_parallel_size=2)
    assert config.context_parallel_size == 2


def test_mhc_recompute_passes_megatron_validation_and_round_trips():
    config = ExperimentConfig.from_dict({"model": {**MHC_RECOMPUTE, "num_layers": 8}})
    model = config.model
    assert model.recompute_mhc and model.recompute_modules == ["mhc"]
    assert model.mhc_recompute_block_size(8) == 2  # round(sqrt(4 * 8 / 6))
    assert ExperimentConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    explicit = ExperimentConfig.from_dict({"model": {**MHC_RECOMPUTE, "mhc_recompute_layer_num": 3}})
    assert explicit.model.mhc_recompute_block_size(8) == 3


def test_flags_turn_hyper_connections_on(capsys):
    code = main(["show-config", "--enable-hyper-connections", "--num-residual-streams", "2",
                 "--set", "model.recompute_granularity=selective", "--set", "model.recompute_modules=[mhc]"])
    out = capsys.readouterr().out
    assert code == 0
    assert "enable_hyper_connections: true" in out and "num_residual_streams: 2" in out
    assert "recompute_modules:\n  - mhc" in out


def pretend_triton_installed(monkeypatch, installed: bool):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "triton":
            return real("os") if installed else None  # any spec stands for an installed package
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_fused_mhc_needs_triton(monkeypatch):
    pretend_triton_installed(monkeypatch, False)
    with pytest.raises(ConfigError, match=r"use_fused_mhc=True needs the triton package.*use_fused_mhc=false"):
        ExperimentConfig.from_dict({"model": {**MHC, "use_fused_mhc": True}})


def test_fused_mhc_is_refused_on_a_cpu_run_and_accepted_on_cuda(monkeypatch):
    pretend_triton_installed(monkeypatch, True)
    config = ExperimentConfig.from_dict({"model": {**MHC, "use_fused_mhc": True}})
    assert config.model.use_fused_mhc
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu = Runtime(device=torch.device("cpu"), bf16=False, rank=0, world_size=1)
    with pytest.raises(ConfigError, match=r"model.use_fused_mhc=true: .*CUDA devices only.*set it to false"):
        runtime_model_config(config, cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the tests' way of running kernels on a CPU
    assert runtime_model_config(config, cpu).use_fused_mhc
    cuda = Runtime(device=torch.device("cuda", 0), bf16=True, rank=0, world_size=1)
    assert runtime_model_config(config, cuda).use_fused_mhc
