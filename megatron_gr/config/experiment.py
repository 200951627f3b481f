"""``ExperimentConfig``: every section of a run, built and validated once from plain values."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from megatron.core.transformer import TransformerConfig

from megatron_gr.config.checkpoint_config import CheckpointConfig
from megatron_gr.config.data_config import DataConfig
from megatron_gr.config.deprecations import apply_deprecations
from megatron_gr.config.embedding_config import EmbeddingTableConfig
from megatron_gr.config.errors import ConfigError
from megatron_gr.config.logging_config import LoggingConfig
from megatron_gr.config.parallel_config import ParallelConfig
from megatron_gr.config.ranking_checks import check_ranking_experiment, contextual_len_of
from megatron_gr.config.ranking_config import RankingConfig
from megatron_gr.config.schema import build_dataclass, check_known_keys, dataclass_to_dict
from megatron_gr.config.training_config import TrainingConfig
from megatron_gr.config.ultra_checks import gather_channel_groups
from megatron_gr.config.transformer_config import GRTransformerConfig

SECTIONS = ("model", "embeddings", "data", "training", "parallel", "checkpoint", "logging", "ranking")

# megatron TransformerConfig fields our layers read and users may set under ``model``.
_BASE_MODEL_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "ffn_hidden_size",
    "hidden_dropout",
    "layernorm_epsilon",
    "init_method_std",
    "recompute_granularity",
    "recompute_modules",
    "fp8",
    "fp8_recipe",
    "fp8_amax_history_len",
    "fp8_amax_compute_algo",
    "fp8_margin",
    "fp8_wgrad",
)
# Model fields derived from another section: one place for each setting.
_SET_ELSEWHERE = {
    "bf16": "training.precision",
    "fp16": "training.precision",
    "params_dtype": "training.precision",
    "pipeline_dtype": "training.precision",
    "tensor_model_parallel_size": "parallel.tensor_model_parallel_size",
    "pipeline_model_parallel_size": "parallel.pipeline_model_parallel_size",
    "sequence_parallel": "parallel.sequence_parallel",
    "context_parallel_size": "parallel.context_parallel_size",
    "context_parallel_split_threshold": "parallel.context_parallel_split_threshold",
}

_BASE_NAMES = {f.name for f in dataclasses.fields(TransformerConfig)}
_OWN_MODEL_FIELDS = tuple(
    f.name for f in dataclasses.fields(GRTransformerConfig) if f.name not in _BASE_NAMES and f.name not in _SET_ELSEWHERE
) + ("attention_dropout",)
MODEL_FIELDS = _BASE_MODEL_FIELDS + _OWN_MODEL_FIELDS

# Defaults of the embedded run: a small HSTU on the synthetic data set, a few CPU minutes.
DEFAULT_MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
                 "qk_head_dim": 32, "v_head_dim": 32, "max_seq_len": 100, "hidden_dropout": 0.2}


@dataclass
class ExperimentConfig:
    model: GRTransformerConfig
    embeddings: dict[str, EmbeddingTableConfig] = field(
        default_factory=lambda: {"item": EmbeddingTableConfig(dim=DEFAULT_MODEL["hidden_size"])}
    )
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    """DLRM-HSTU's features, encoders, tower and tasks (``model.type: ranking`` only)."""

    def __post_init__(self):
        if self.model.type == "ranking":
            check_ranking_experiment(self)
        else:
            self._validate_retrieval()
        self._validate_layout()
        self._validate_optimizer()

    def _validate_retrieval(self) -> None:
        item = self.embeddings.get("item")
        if item is None:
            raise ConfigError("embeddings.item is missing: the retrieval model needs an item table")
        if item.dim != self.model.hidden_size:
            raise ConfigError(
                f"embeddings.item.dim={item.dim} must equal model.hidden_size="
                f"{self.model.hidden_size}: item embeddings are the STU input and the output "
                "space scored against"
            )
        if self.data.source == "impressions":
            raise ConfigError(
                "data.source='impressions' holds ranking samples: set model.type=ranking, or read "
                "synthetic, movielens or prepared data for retrieval"
            )
        self._validate_model_type()
        self._validate_dynamic_item_table()

    def _validate_layout(self) -> None:
        """Parallel sizes the model's shape allows (the world size is checked at launch)."""
        model, parallel = self.model, self.parallel
        tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
        if model.num_attention_heads % tp != 0:
            raise ConfigError(
                f"model.num_attention_heads={model.num_attention_heads} is not divisible by "
                f"parallel.tensor_model_parallel_size={tp}: tensor parallelism gives each rank "
                "whole heads; choose a tensor-parallel size that divides the heads"
            )
        if pp > model.num_layers:
            raise ConfigError(
                f"parallel.pipeline_model_parallel_size={pp} asks for more pipeline stages than "
                f"model.num_layers={model.num_layers}: every stage needs at least one layer"
            )
        if model.num_layers % pp != 0:
            raise ConfigError(
                f"model.num_layers={model.num_layers} is not divisible by "
                f"parallel.pipeline_model_parallel_size={pp}: stages hold equal numbers of layers"
            )

    def _validate_optimizer(self) -> None:
        # megatron's DistributedOptimizer asserts on anything but Adam (megatron-core 0.16.1)
        if self.training.optimizer != "adam" and self.parallel.use_distributed_optimizer:
            raise ConfigError(
                f"training.optimizer={self.training.optimizer!r} with parallel.use_distributed_optimizer=true: "
                "megatron's distributed optimizer only runs Adam; set training.optimizer=adam or "
                "parallel.use_distributed_optimizer=false"
            )

    def _validate_model_type(self) -> None:
        model = self.model
        if model.time_bias_origin == "query" and model.relative_attention_bias and self.parallel.context_parallel_size > 1:
            raise ConfigError(
                f"model.time_bias_origin='query' with parallel.context_parallel_size={self.parallel.context_parallel_size}: "
                "the context-parallel attention buckets the bias from the keys' timestamps only; set "
                "model.time_bias_origin=token or context_parallel_size=1"
            )
        if self.model.type == "retrieval" and self.model.contextual_len > 0:
            raise ConfigError(
                "model.contextual_len > 0 needs contextual features, which the HSTU retrieval model "
                "does not take: set model.contextual_len=0"
            )

    def _validate_dynamic_item_table(self) -> None:
        """What a dynamic (hash-table) item table supports in the retrieval model."""
        item, pp = self.embeddings["item"], self.parallel.pipeline_model_parallel_size
        if item.type != "dynamic":
            return
        if pp > 1:
            raise ConfigError(
                f"embeddings.item.type=dynamic with parallel.pipeline_model_parallel_size={pp}: a dynamic "
                "item table under pipeline parallelism is not supported yet (the first and the last "
                "stage would each need the table); use pipeline_model_parallel_size=1 or type=plain"
            )
        if item.dynamic.pooling != "none":
            raise ConfigError(
                f"embeddings.item.dynamic.pooling={item.dynamic.pooling!r}: the item table embeds "
                "every event of a sequence; set embeddings.item.dynamic.pooling=none"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ExperimentConfig":
        """Builds from ``{section: {key: value}}``; keys not given keep their defaults."""
        if not isinstance(raw, dict):
            raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
        check_known_keys(raw, SECTIONS, "<top level>")
        for name, section in raw.items():
            if section is not None and not isinstance(section, dict):
                raise ConfigError(f"section {name} must be a mapping of keys, got {section!r}")
        raw = apply_deprecations(raw)
        model_raw = dict(raw.get("model") or {})
        for key, owner in _SET_ELSEWHERE.items():
            if key in model_raw:
                raise ConfigError(f"model.{key} cannot be set here: it follows {owner}")
        ranks = model_raw.get("type") == "ranking"
        if raw.get("ranking") is not None and not ranks:
            raise ConfigError("the ranking section configures the ranking model: set model.type=ranking or remove it")
        ranking = build_dataclass(RankingConfig, gather_channel_groups(raw.get("ranking") or {}), "ranking")
        if ranks and "contextual_len" not in model_raw:
            model_raw["contextual_len"] = contextual_len_of(ranking)  # one token per contextual feature
        model = build_dataclass(GRTransformerConfig, {**DEFAULT_MODEL, **model_raw}, "model", MODEL_FIELDS)
        # Retrieval's item table by default; ranking tables are all named by its features.
        embeddings = {} if ranks else {"item": {"dim": model.hidden_size}}
        for name, table in (raw.get("embeddings") or {}).items():
            if not isinstance(table, dict):
                raise ConfigError(f"embeddings.{name} must be a mapping of keys, got {table!r}")
            embeddings[name] = {**embeddings.get(name, {}), **table}
        return cls(
            model=model,
            embeddings={
                name: build_dataclass(EmbeddingTableConfig, table, f"embeddings.{name}")
                for name, table in embeddings.items()
            },
            data=build_dataclass(DataConfig, raw.get("data") or {}, "data"),
            training=build_dataclass(TrainingConfig, raw.get("training") or {}, "training"),
            parallel=build_dataclass(ParallelConfig, raw.get("parallel") or {}, "parallel"),
            checkpoint=build_dataclass(CheckpointConfig, raw.get("checkpoint") or {}, "checkpoint"),
            logging=build_dataclass(LoggingConfig, raw.get("logging") or {}, "logging"),
            ranking=ranking,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values of every section (what ``from_dict`` reads back)."""
        return {
            "model": dataclass_to_dict(self.model, MODEL_FIELDS),
            "embeddings": {name: dataclass_to_dict(t) for name, t in self.embeddings.items()},
            "data": dataclass_to_dict(self.data),
            "training": dataclass_to_dict(self.training),
            "parallel": dataclass_to_dict(self.parallel),
            "checkpoint": dataclass_to_dict(self.checkpoint),
            "logging": dataclass_to_dict(self.logging),
            **({"ranking": dataclass_to_dict(self.ranking)} if self.model.type == "ranking" else {}),
        }
