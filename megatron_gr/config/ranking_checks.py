"""Checks of a ranking experiment that span sections (``ranking``, ``embeddings``,
``data``, ``model``, ``parallel``), run when the config is built: an unknown column, a
missing table or a width that does not fit is one line naming it, before anything is read
or built."""

from __future__ import annotations

import dataclasses

from megatron_gr.config.errors import ConfigError
from megatron_gr.config.fp8_validation import NATIVE_FP8_RECIPES, TE_FP8_RECIPES, recipe_name
from megatron_gr.config.ultra_checks import check_ultra_experiment
from megatron_gr.config.validation import require
from megatron_gr.data.errors import DataFormatError
from megatron_gr.data.ranking.columns import SOURCE_COLUMNS
from megatron_gr.data.ranking.source import resolve_ranking_source

RANKING_SOURCES = ("auto", "synthetic", "movielens", "impressions")
# Model fields only the retrieval model reads (its preprocessor and head), at their defaults.
_RETRIEVAL_ONLY = {
    "time_feature": "since_previous",
    "position_encoding": "from_start",
    "scale_item_embeddings": True,
    "retrieval_loss": "sampled_softmax",
    "output_normalization": "l2",
}


def check_ranking_experiment(config) -> None:
    """Raises ConfigError for the first problem of a ranking ``ExperimentConfig``."""
    _check_source(config)
    _check_model(config)
    source = _known_source(config)
    check_ultra_experiment(config, source)  # channel groups before the tables they name
    _check_columns(config, source)
    _check_tables(config)
    _check_widths(config)
    _check_sequence_room(config, source)


def contextual_len_of(ranking) -> int:
    """Contextual tokens of a sequence: one per contextual feature."""
    return len(ranking.features.contextual)


def _check_source(config) -> None:
    source = config.data.source
    require(
        source in RANKING_SOURCES,
        f"data.source={source!r} holds retrieval sequences; the ranking model reads "
        f"{', '.join(RANKING_SOURCES)}",
    )


def _known_source(config):
    """The source the data resolves to, or None when the path does not tell yet (a missing
    or unreadable path is reported when the data is read)."""
    try:
        return resolve_ranking_source(config.data.source, config.data.path)
    except (DataFormatError, FileNotFoundError):
        return None


def _check_model(config) -> None:
    """Model settings the ranking model does not have: one line each, never ignored."""
    model = config.model
    require(
        model.block_type == "stu",
        f"model.block_type={model.block_type!r}: the ranking model's target-aware attention needs STU layers; "
        "set model.block_type=stu",
    )
    require(
        not (model.relative_attention_bias and model.time_bias_origin == "query"),
        "model.time_bias_origin='query' is a retrieval option (the time of the event each token predicts); "
        "ranking tokens are bucketed by |ts_i - ts_j|: set model.time_bias_origin=token",
    )
    for name, default in _RETRIEVAL_ONLY.items():
        value = getattr(model, name)
        require(
            value == default,
            f"model.{name}={value!r} configures the retrieval model, which model.type=ranking does not build: "
            f"leave it at {default!r} (ranking encodings are under ranking:)",
        )
    _check_fp8(model)


def _check_fp8(model) -> None:
    """FP8 combinations the ranking models cannot run (the rest: ``config/fp8_validation.py``)."""
    if model.fp8 is None:
        return
    recipe = recipe_name(model)
    # fp8_validation has checked the recipe against the backend (TE's recipes when it is
    # installed); the tower's native linears take only the recipes both backends share then.
    accepted = [name for name in NATIVE_FP8_RECIPES if name in TE_FP8_RECIPES]
    require(
        recipe in NATIVE_FP8_RECIPES,
        f"model.fp8_recipe={recipe!r} with model.type=ranking: the ranking tower's FP8 linears are the native "
        f"ones, which take {', '.join(accepted)} beside Transformer Engine; choose one of those or unset model.fp8",
    )
    require(
        not (model.recompute_uvqk and recipe == "delayed"),
        "model.recompute_uvqk with model.fp8_recipe='delayed': the replayed UVQK projection would quantise "
        "with the scale its first pass just moved (and record its amax twice); use fp8_recipe=tensorwise or "
        "rowwise, or unset recompute_uvqk",
    )
    _check_fp8_channel_sizes(model)


def _check_fp8_channel_sizes(model) -> None:
    """Each ULTRA channel's STU linears at its own width take FP8 GEMMs (multiples of 16)."""
    if not model.transducers:
        return
    from megatron_gr.transformer.fp8.backend import stu_shape_problem  # imports megatron-core

    for index, channel in enumerate(model.transducers):
        problem = stu_shape_problem(dataclasses.replace(model, transducers=None, **channel.overrides()))
        require(
            problem is None,
            f"model.transducers[{index}] ({channel.name or 'unnamed'}) with model.fp8={model.fp8!r}: {problem}; "
            "change the channel's sizes or unset model.fp8",
        )


def _check_columns(config, source) -> None:
    """Every named column exists in a built-in source (a CSV's header is checked when read)."""
    ranking = config.ranking
    provided = SOURCE_COLUMNS.get(source)
    if provided is None:
        return
    for group, names in ranking.features.columns().items():
        for name in names:
            if name not in provided[group]:
                offered = ", ".join(provided[group]) or "none"
                raise ConfigError(
                    f"ranking.features.{group} names column {name!r}, which the {source} data set does not "
                    f"provide for {group}; it provides: {offered}"
                )
    for task in ranking.tasks:
        if task.label not in provided["labels"]:
            raise ConfigError(
                f"ranking.tasks[{task.name}].label={task.label!r} is not a label of the {source} data set; "
                f"its labels: {', '.join(provided['labels'])}"
            )
    if ranking.action_encoder.watchtime_thresholds:
        require(
            ranking.features.uih_watchtime is not None,
            "ranking.action_encoder.watchtime_thresholds needs ranking.features.uih_watchtime: name the "
            "watch-time column or drop the thresholds",
        )


def _check_tables(config) -> None:
    pp = config.parallel.pipeline_model_parallel_size
    groups = {**config.ranking.features.embedded(), **config.ranking.features.channel_embedded()}
    for group, features in groups.items():
        for feature, table in features.items():
            settings = config.embeddings.get(table)
            if settings is None:
                raise ConfigError(
                    f"ranking.features.{group}.{feature} is looked up in table {table!r}, which is not under "
                    f"embeddings; add embeddings.{table}.dim (tables: {', '.join(config.embeddings) or 'none'})"
                )
            if settings.type == "dynamic":
                require(
                    pp == 1,
                    f"embeddings.{table}.type=dynamic with parallel.pipeline_model_parallel_size={pp}: dynamic tables "
                    "under pipeline parallelism are not supported yet; use pipeline_model_parallel_size=1 or type=plain",
                )
                require(
                    settings.dynamic.pooling == "none",
                    f"embeddings.{table}.dynamic.pooling={settings.dynamic.pooling!r}: ranking features look up one "
                    f"id per token; set embeddings.{table}.dynamic.pooling=none",
                )
    used = {table for features in groups.values() for table in features.values()}
    unused = [name for name in config.embeddings if name not in used]
    if unused:
        raise ConfigError(
            f"embeddings.{unused[0]} is not used by any ranking feature: name it in ranking.features or remove it"
        )


def _check_widths(config) -> None:
    ranking, tables = config.ranking, config.embeddings
    history = sum(tables[t].dim for t in ranking.features.uih.values())
    candidate = sum(tables[t].dim for t in ranking.features.candidate.values())
    if ranking.content_encoder.type == "slice" and history != candidate:
        raise ConfigError(
            f"ranking.content_encoder.type=slice needs history and candidate tokens of one width, but the "
            f"features of ranking.features.uih are {history} wide and those of ranking.features.candidate "
            f"{candidate}; make the table dims match or use content_encoder.type=mlp"
        )
    contextual = contextual_len_of(ranking)
    require(
        config.model.contextual_len == contextual,
        f"model.contextual_len={config.model.contextual_len} must equal the number of contextual features "
        f"({contextual}: {', '.join(ranking.features.contextual) or 'none'}); leave it unset to follow them",
    )


def _check_sequence_room(config, source) -> None:
    """The contextual tokens, the candidates and one history event fit ``max_seq_len``
    (longer histories keep their latest events)."""
    data = config.data.ranking
    candidates = {"synthetic": data.synthetic.candidates_per_request, "movielens": data.num_candidates}.get(source)
    if candidates is None:
        return  # known once the file is read
    needed = config.model.contextual_len + candidates + (1 if config.ranking.use_history else 0)
    require(
        config.model.max_seq_len >= needed,
        f"model.max_seq_len={config.model.max_seq_len} leaves no room: a sequence holds "
        f"{config.model.contextual_len} contextual tokens and {candidates} candidates besides its history; "
        f"use max_seq_len >= {needed}",
    )
