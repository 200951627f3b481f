"""Every user mistake in a config is a ConfigError naming the key, the value and the fix."""

from __future__ import annotations

import pytest

from megatron_gr.config import ConfigError, ExperimentConfig, GRTransformerConfig, resolve_config

BAD_CONFIGS = [
    # (raw config, words the message must contain)
    ({"model": {"num_layer": 2}}, ["unknown key model.num_layer", "did you mean model.num_layers"]),
    ({"modle": {}}, ["unknown key <top level>.modle", "model"]),
    ({"model": {"num_layers": 0}}, ["model.num_layers=0", ">= 1"]),
    ({"model": {"num_layers": "two"}}, ["model.num_layers='two'", "integer"]),
    ({"model": {"num_layers": True}}, ["model.num_layers=True", "integer"]),
    ({"model": {"hidden_size": 64, "num_attention_heads": 3, "qk_head_dim": 0}}, ["model.qk_head_dim=0", "[1, 1024]"]),
    ({"model": {"attention_kernel": "cuda"}}, ["model.attention_kernel='cuda'", "'pytorch', 'triton'"]),
    ({"training": {"kernel_backend": "cuda"}}, ["training.kernel_backend='cuda'", "'auto', 'pytorch', 'triton'"]),
    ({"model": {"type": "ranker"}}, ["model.type='ranker'", "'retrieval'"]),
    ({"model": {"attention_normalizer": "sum"}}, ["model.attention_normalizer='sum'", "max_seq_len"]),
    ({"model": {"hidden_dropout": 1.5}}, ["model.hidden_dropout=1.5", "[0, 1)"]),
    ({"model": {"hidden_dropout": 1.0}}, ["model.hidden_dropout=1.0", "dropout probability must be in [0, 1)"]),
    ({"model": {"embedding_dropout": 1}}, ["model.embedding_dropout=1.0", "dropout probability must be in [0, 1)"]),
    ({"model": {"embedding_dropout": -0.5}}, ["model.embedding_dropout=-0.5", ">= 0"]),
    ({"model": {"attention_dropout": 0.1}}, ["attention_dropout=0.1", "hidden_dropout"]),
    ({"model": {"max_seq_len": 10, "contextual_len": 10}}, ["contextual_len=10", "max_seq_len=10"]),
    ({"model": {"sla_k1": 8, "max_attn_len": 4}}, ["sla_k1=8", "max_attn_len=4", "set max_attn_len=0"]),
    ({"model": {"sla_k2": 8}}, ["sla_k2=8", "set sla_k1 > 0"]),
    ({"model": {"sla_k1": -1}}, ["sla_k1=-1", ">= 0"]),
    ({"model": {"softmax_temperature": 0}}, ["model.softmax_temperature=0.0", "> 0"]),
    ({"model": {"num_negatives": 0, "num_in_batch_negatives": 0}}, ["num_negatives=0", "without negatives"]),
    ({"model": {"bf16": True}}, ["model.bf16", "training.precision"]),
    ({"model": {"time_bucket_fn": "cube"}}, ["model.time_bucket_fn='cube'", "'sqrt', 'log'"]),
    ({"embeddings": {"item": {"dim": 32}}}, ["embeddings.item.dim=32", "model.hidden_size=64"]),
    ({"embeddings": {"item": {"type": "hash"}}}, ["embeddings.item.type='hash'", "'plain'"]),
    ({"embeddings": {"item": {"dimension": 64}}}, ["unknown key embeddings.item.dimension", "dim"]),
    ({"data": {"source": "movielens"}}, ["source='movielens'", "--data-path"]),
    ({"data": {"source": "kaggle"}}, ["data.source='kaggle'", "'auto', 'synthetic', 'movielens', 'prepared'"]),
    ({"data": {"source": "synthetic", "path": "ml-100k"}}, ["data.source='synthetic'", "ignore data.path='ml-100k'", "auto"]),
    ({"data": {"deduplicate": "yes"}}, ["data.deduplicate='yes'", "true or false"]),
    ({"training": {"max_nonfinite_steps": -1}}, ["training.max_nonfinite_steps=-1", ">= 0"]),
    ({"data": {"synthetic": {"num_users": -1}}}, ["num_users", "-1"]),
    ({"training": {"lr": -0.1}}, ["training.lr=-0.1", "> 0"]),
    ({"training": {"lr": "fast"}}, ["training.lr='fast'", "number"]),
    ({"training": {"micro_batch_size": 0}}, ["training.micro_batch_size=0", ">= 1"]),
    ({"training": {"micro_batch_size": 32, "global_batch_size": 48}}, ["global_batch_size=48", "multiple", "micro_batch_size=32"]),
    ({"training": {"train_iters": 10, "lr_warmup_iters": 10}}, ["lr_warmup_iters=10", "smaller than"]),
    ({"training": {"precision": "fp8"}}, ["training.precision='fp8'", "'auto', 'fp32', 'bf16'"]),
    ({"training": {"min_lr": 0.1, "lr": 0.01}}, ["min_lr=0.1", "lr=0.01"]),
    ({"checkpoint": {"save_interval": 0}}, ["checkpoint.save_interval=0", ">= 1"]),
    ({"logging": {"progress": "fancy"}}, ["logging.progress='fancy'", "'bar'"]),
    ({"model": []}, ["section model must be a mapping"]),
    ({"training": {"seed": None}}, ["training.seed=None", "integer"]),
]


@pytest.mark.parametrize("raw, words", BAD_CONFIGS, ids=[str(i) for i in range(len(BAD_CONFIGS))])
def test_bad_config_is_a_clear_error(raw, words):
    with pytest.raises(ConfigError) as caught:
        ExperimentConfig.from_dict(raw)
    message = str(caught.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_defaults_build_and_round_trip():
    config = ExperimentConfig.from_dict({})
    assert config.model.num_layers == 2 and config.embeddings["item"].dim == config.model.hidden_size
    again = ExperimentConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()


def test_item_dim_follows_hidden_size_when_unset():
    config = ExperimentConfig.from_dict({"model": {"hidden_size": 128, "num_attention_heads": 4}})
    assert config.embeddings["item"].dim == 128


def test_nested_sections_and_yaml_quirks(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  lr: 1e-3\nlogging:\n  progress: off\ndata:\n  synthetic:\n    num_users: 77\n")
    config = resolve_config(str(path), [(["model", "num_layers"], 3)])
    assert config.training.lr == pytest.approx(1e-3)
    assert config.logging.progress == "off"
    assert config.data.synthetic.num_users == 77
    assert config.model.num_layers == 3


@pytest.mark.parametrize(
    "text, words",
    [
        ("model: [1, 2\n", ["not valid YAML"]),
        ("- 1\n- 2\n", ["must hold a mapping of sections", "list"]),
    ],
)
def test_bad_yaml_file(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        resolve_config(str(path))
    for word in words:
        assert word in str(caught.value)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(str(tmp_path / "nope.yaml"))


def test_gr_transformer_config_is_a_megatron_config():
    from megatron.core.transformer import TransformerConfig

    config = GRTransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, qk_head_dim=16)
    assert isinstance(config, TransformerConfig)
    assert config.alpha == pytest.approx(16**-0.5)
    with pytest.raises(ConfigError, match="tensor_model_parallel_size"):
        GRTransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=3, tensor_model_parallel_size=2)
