"""Hyper-connection settings: every guard names the key, the value and the fix; the flags
and ``recompute_modules: [mhc]`` reach the model config past megatron's own validation."""

from __future__ import annotations

import pytest
import torch

from megatron_gr.cli import main
from megatron_gr.config import ConfigError, ExperimentConfig, GRTransformerConfig

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
