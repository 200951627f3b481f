"""Is a checkpoint the same model as this run's? Checked before megatron reads a tensor.

The ``config.yaml`` saved in the checkpoint (or, for older checkpoints, beside it) and the
model facts of its manifest are compared with this run: settings that shape or give meaning
to the weights must match; everything else (learning rate, steps, paths, logging, parallel
layout, seed, dropout, kernels) may change between runs. A mismatch is one error line that
names every differing field with both values — never megatron's shape traceback, and never a
silent partial load (4 heads of width 4 fill the same tensors as 2 heads of width 8; a
run without relative attention bias would drop those weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_gr.config.experiment import ExperimentConfig
from megatron_gr.training.checkpoint_errors import CheckpointError

# Settings that define the weights: their shapes, or what a row of a table stands for.
MUST_MATCH = (
    "model.type",
    "model.num_layers",
    "model.hidden_size",
    "model.num_attention_heads",
    "model.qk_head_dim",
    "model.v_head_dim",
    "model.max_seq_len",
    "model.num_time_buckets",
    "model.time_bucket_fn",
    "model.relative_attention_bias",
    "model.enable_hyper_connections",
    "model.contextual_len",
    # Shapes of the ranking model's encoders and tower (absent from other models' configs).
    "ranking.features",
    "ranking.num_position_buckets",
    "ranking.action_encoder.action_weights",
    "ranking.action_encoder.watchtime_thresholds",
    "ranking.action_encoder.dim",
    "ranking.action_encoder.mlp_hidden",
    "ranking.content_encoder.type",
    "ranking.content_encoder.dim",
    "ranking.content_encoder.mlp_hidden",
    "ranking.output_postprocessor",
    "ranking.time_period_units",
    "ranking.tower.hidden_sizes",
    "ranking.tower.layer_norm",
)
# Per table, under every table name either config has (``embeddings.<name>.<field>``).
MUST_MATCH_PER_TABLE = ("type", "dim")
# Lists of records compared by some of their fields: the tasks' heads are named and typed.
MUST_MATCH_FIELDS_OF = {"ranking.tasks": ("name", "type")}
# ULTRA-HSTU channels, in order (the tower reads their outputs concatenated in this order);
# a field a channel leaves unset is the model's.
CHANNEL_SHAPE_FIELDS = ("name", "num_layers", "hidden_size", "num_attention_heads", "qk_head_dim", "v_head_dim")
# Settings that matter only when a feature is on in both runs.
MUST_MATCH_WHEN = {
    "model.num_position_buckets": "model.relative_attention_bias",
    "model.num_residual_streams": "model.enable_hyper_connections",
}


def model_facts(model, config: ExperimentConfig) -> dict[str, Any]:
    """What the config alone does not say: the model class and the item space of the data.
    A plain item table's rows are dense ids of this data set's items, so the item count must
    match; a dynamic table is keyed by raw ids and may meet other items. A model with
    several plain tables lists their rows (``model.table_rows``)."""
    facts = {"model_type": type(model).__name__}
    table_rows = getattr(model, "table_rows", None)
    if table_rows:
        facts["table_rows"] = {name: int(rows) for name, rows in sorted(table_rows.items())}
    item = config.embeddings.get("item")
    if item is None:
        return facts
    facts["item_table"] = item.type
    num_items = getattr(model, "num_items", None)
    if item.type == "plain" and num_items is not None:
        facts["num_items"] = int(num_items)
        facts["item_table_rows"] = int(item.num_embeddings or num_items + 1)
    return facts


def _lookup(tree: dict, dotted: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def read_saved_config(directory: Path, root: Path) -> tuple[Optional[dict], Optional[Path]]:
    """The config saved in ``directory`` (or, for checkpoints written before that, the one
    in ``root``) as plain values, with its path; (None, None) when there is none."""
    for path in (directory / "config.yaml", root / "config.yaml"):
        if path.is_file():
            try:
                saved = yaml.safe_load(path.read_bytes().decode("utf-8"))
            except (UnicodeDecodeError, yaml.YAMLError):
                saved = None
            if not isinstance(saved, dict):
                raise CheckpointError(f"{path} is corrupt: not a YAML config of sections")
            return saved, path
    return None, None


def check_same_model(
    *, saved_config: Optional[dict], saved_facts: Optional[dict], config: ExperimentConfig, facts: dict, where: Path,
    config_path: Optional[Path] = None,
) -> None:
    """Raises one CheckpointError naming every field where the checkpoint's model differs
    from this run's. Fields the saved config does not have (older versions) are skipped."""
    differences = []
    if saved_config is not None:
        current = config.to_dict()
        tables = sorted(set(saved_config.get("embeddings") or {}) | set(current["embeddings"]))
        keys = list(MUST_MATCH) + [key for key, when in MUST_MATCH_WHEN.items()
                                   if _lookup(saved_config, when)[1] and _lookup(current, when)[1]]
        keys += [f"embeddings.{name}.{field}" for name in tables for field in MUST_MATCH_PER_TABLE]
        for key in keys + list(MUST_MATCH_FIELDS_OF):
            known, value = _lookup(saved_config, key)
            ours = _lookup(current, key)[1]
            if key in MUST_MATCH_FIELDS_OF:
                value, ours = _fields_of(value, MUST_MATCH_FIELDS_OF[key]), _fields_of(ours, MUST_MATCH_FIELDS_OF[key])
            if known and value != ours:
                differences.append(f"{key}={value!r} there, {ours!r} in this run")
        saved_channels, our_channels = _channels(saved_config), _channels(current)
        if saved_channels is not None and saved_channels != our_channels:
            differences.append(f"model.transducers={saved_channels!r} there, {our_channels!r} in this run")
    for key, value in (saved_facts or {}).items():
        if key in facts and facts[key] != value:
            differences.append(f"{_FACT_NAMES.get(key, key)} {value!r} there, {facts[key]!r} in this run")
    if differences:
        source = f" (its settings: {config_path})" if config_path is not None else ""
        raise CheckpointError(
            f"{where} holds another model: {'; '.join(differences)}. Load it with the model settings that "
            f"saved it{source}, or start without --load"
        )


def _channels(config: dict) -> Optional[list[dict]]:
    """The channels' shapes in order, unset fields filled from ``model`` (None: no channels)."""
    model = config.get("model") or {}
    channels = model.get("transducers")
    if not isinstance(channels, list):
        return None
    return [{f: (c.get(f) if c.get(f) is not None else model.get(f)) if isinstance(c, dict) else c
             for f in CHANNEL_SHAPE_FIELDS} for c in channels]


def _fields_of(records: Any, fields: tuple[str, ...]) -> Any:
    """``[{field: value}]`` restricted to ``fields`` (anything else as it is)."""
    if not isinstance(records, list):
        return records
    return [{f: r.get(f) for f in fields} if isinstance(r, dict) else r for r in records]


_FACT_NAMES = {
    "model_type": "model type",
    "item_table": "item table type",
    "num_items": "items in the data set (dense ids of a plain item table)",
    "item_table_rows": "item table rows",
    "table_rows": "rows of the plain tables",
}
