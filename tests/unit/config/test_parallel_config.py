"""Impossible parallel layouts stop the run before it starts, naming the sizes and the fix."""

from __future__ import annotations

import pytest

from megatron_gr.cli import main
from megatron_gr.config import ConfigError, ExperimentConfig, ParallelConfig

BAD_LAYOUTS = [
    # (raw config, words the message must contain)
    ({"model": {"num_attention_heads": 3, "hidden_size": 48}, "parallel": {"tensor_model_parallel_size": 2}},
     ["model.num_attention_heads=3", "parallel.tensor_model_parallel_size=2", "whole heads"]),
    ({"model": {"num_layers": 2}, "parallel": {"pipeline_model_parallel_size": 4}},
     ["parallel.pipeline_model_parallel_size=4", "more pipeline stages than model.num_layers=2"]),
    ({"model": {"num_layers": 3}, "parallel": {"pipeline_model_parallel_size": 2}},
     ["model.num_layers=3", "not divisible", "pipeline_model_parallel_size=2"]),
    ({"parallel": {"sequence_parallel": True}},
     ["sequence_parallel=true", "tensor_model_parallel_size > 1", "--tensor-model-parallel-size"]),
    ({"parallel": {"tensor_model_parallel_size": 0}}, ["parallel.tensor_model_parallel_size=0", ">= 1"]),
    ({"parallel": {"pipeline_model_parallel_size": "two"}}, ["parallel.pipeline_model_parallel_size='two'", "integer"]),
    ({"parallel": {"micro_batch_balance": "tokens"}}, ["parallel.micro_batch_balance='tokens'", "'attention_cost'"]),
    ({"parallel": {"ddp_bucket_size": 0}}, ["parallel.ddp_bucket_size=0", ">= 1"]),
    ({"parallel": {"data_parallel_size": 2}}, ["unknown key parallel.data_parallel_size"]),
    ({"model": {"tensor_model_parallel_size": 2}}, ["model.tensor_model_parallel_size", "parallel.tensor_model_parallel_size"]),
    ({"model": {"sequence_parallel": True}}, ["model.sequence_parallel", "parallel.sequence_parallel"]),
    ({"model": {"num_layers": 2}, "embeddings": {"item": {"type": "dynamic"}}, "parallel": {"pipeline_model_parallel_size": 2}},
     ["embeddings.item.type=dynamic", "parallel.pipeline_model_parallel_size=2", "pipeline_model_parallel_size=1"]),
    ({"embeddings": {"item": {"type": "dynamic", "dynamic": {"pooling": "sum"}}}},
     ["embeddings.item.dynamic.pooling='sum'", "pooling=none"]),
    ({"training": {"optimizer": "sgd"}},
     ["training.optimizer='sgd'", "use_distributed_optimizer=true", "use_distributed_optimizer=false"]),
    ({"parallel": {"context_parallel_size": 0}}, ["parallel.context_parallel_size=0", ">= 1"]),
    ({"parallel": {"context_parallel_size": 4, "context_parallel_split_threshold": 6}},
     ["parallel.context_parallel_split_threshold=6", "2 x context_parallel_size = 8", "set it to 8 or more"]),
    ({"model": {"context_parallel_size": 2}}, ["model.context_parallel_size", "parallel.context_parallel_size"]),
    ({"model": {"context_parallel_split_threshold": 64}},
     ["model.context_parallel_split_threshold", "parallel.context_parallel_split_threshold"]),
]


@pytest.mark.parametrize("raw, words", BAD_LAYOUTS, ids=[str(i) for i in range(len(BAD_LAYOUTS))])
def test_impossible_layout_is_a_clear_error(raw, words):
    with pytest.raises(ConfigError) as caught:
        ExperimentConfig.from_dict(raw)
    for word in words:
        assert word in str(caught.value), f"{word!r} not in {str(caught.value)!r}"


def test_sgd_runs_without_the_distributed_optimizer():
    config = ExperimentConfig.from_dict({"training": {"optimizer": "sgd"}, "parallel": {"use_distributed_optimizer": False}})
    assert config.training.optimizer == "sgd"


def test_dynamic_item_table_allows_tensor_and_sequence_parallelism():
    """Its rows are copied on tensor-parallel ranks (tests/unit/parallel/test_dynamic_multi_rank.py)."""
    config = ExperimentConfig.from_dict({
        "embeddings": {"item": {"type": "dynamic"}},
        "parallel": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
    })
    assert config.embeddings["item"].type == "dynamic"


@pytest.mark.parametrize("world", [3, 6])
def test_world_size_must_split_into_model_parallel_groups(world):
    with pytest.raises(ConfigError) as caught:
        ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2).data_parallel_size(world)
    assert f"world size {world} is not divisible by" in str(caught.value)
    assert "2 x 1 x 2" in str(caught.value) and "multiple of 4" in str(caught.value)


def test_data_parallel_size_and_balance():
    layout = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert layout.data_parallel_size(8) == 2
    with_context = ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=2, pipeline_model_parallel_size=2)
    assert with_context.data_parallel_size(16) == 2
    with pytest.raises(ConfigError, match="context_parallel_size x pipeline_model_parallel_size = 2 x 2 x 2"):
        with_context.data_parallel_size(12)
    assert layout.balance_for(2) == "attention_cost" and layout.balance_for(1) == "none"
    assert ParallelConfig(micro_batch_balance="none").balance_for(4) == "none"


def test_parallel_flags_reach_their_keys(capsys):
    code = main(["show-config", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                 "--sequence-parallel", "--context-parallel-size", "2", "--set", "model.num_layers=4",
                 "--set", "parallel.ddp_bucket_size=1000000"])
    out = capsys.readouterr().out
    assert code == 0
    for line in ("tensor_model_parallel_size: 2", "pipeline_model_parallel_size: 2", "sequence_parallel: true",
                 "use_distributed_optimizer: true", "ddp_bucket_size: 1000000", "micro_batch_balance: auto",
                 "context_parallel_size: 2", "context_parallel_split_threshold: 1024"):
        assert line in out
    assert "model:" in out and "\n  context_parallel" not in out.split("parallel:")[0]  # not a model key


def test_cli_reports_an_impossible_layout_in_one_line(capsys):
    assert main(["show-config", "--pipeline-model-parallel-size", "3"]) == 2
    assert capsys.readouterr().err.startswith("error: parallel.pipeline_model_parallel_size=3 asks for more pipeline stages")
