"""Checks of an ULTRA-HSTU ranking experiment (``model.transducers``, attention truncation,
rematerialization) that need other sections: the channels' feature groups, the data's
columns, the parallel layout. Each problem is one line, raised before anything is built.
"""

from __future__ import annotations

import dataclasses
import difflib

from megatron_gr.config.errors import ConfigError
from megatron_gr.config.ranking_config import FeatureGroupsConfig
from megatron_gr.config.transducer_config import CHANNEL_GROUP_SUFFIXES, TransducerConfig, channel_group_names
from megatron_gr.config.validation import require
from megatron_gr.data.ranking.channels import SOURCE_EVENT_STORES


def gather_channel_groups(ranking_raw):
    """The raw ``ranking`` section with the keys of ``ranking.features`` that are not
    DLRM-HSTU's groups moved under ``features.channel_groups`` (channels' groups are written
    beside ``uih``; which of them a channel needs is checked once the channels are known)."""
    if not isinstance(ranking_raw, dict) or not isinstance(ranking_raw.get("features"), dict):
        return ranking_raw
    known = {f.name for f in dataclasses.fields(FeatureGroupsConfig)}
    features = dict(ranking_raw["features"])
    moved = {key: features.pop(key) for key in list(features) if key not in known}
    if moved:
        features["channel_groups"] = {**(features.get("channel_groups") or {}), **moved}
    return {**ranking_raw, "features": features}


def channels_of(model) -> list[TransducerConfig]:
    """The channels of a ranking model config (one unnamed channel without ``transducers``)."""
    return list(model.transducers) if model.transducers else [TransducerConfig()]


def channel_features(features: FeatureGroupsConfig, name: str) -> FeatureGroupsConfig:
    """The feature groups channel ``name`` reads, as DLRM-HSTU's (its history under ``uih``)."""
    if name == "":
        return features
    groups = features.channel_groups
    return dataclasses.replace(
        features,
        uih=groups[name],
        uih_action=groups.get(name + "_action"),
        uih_watchtime=groups.get(name + "_watchtime"),
        uih_timestamp=groups[name + "_timestamp"],
        channel_groups={},
    )


def check_ultra_experiment(config, source) -> None:
    """Raises ConfigError for the first problem of the channels of a ranking experiment;
    ``source``: the data source ``data.source`` resolves to (None: not known yet)."""
    model, features = config.model, config.ranking.features
    channels = channels_of(model)
    named = [c.name for c in channels if c.name]
    _check_group_names(features, named, uses_transducers=model.uses_transducers)
    if not model.uses_transducers:
        return
    cp = config.parallel.context_parallel_size
    require(
        cp == 1,
        f"parallel.context_parallel_size={cp} with ULTRA-HSTU (model.transducers, attention truncation or "
        "rematerialization): its channels do not run under context parallelism yet; use context_parallel_size=1",
    )
    _check_needed_groups(config, named)
    _check_stores(config, channels, source)
    for i, channel in enumerate(channels):
        _check_channel_layout(config, i, channel)


def _check_group_names(features: FeatureGroupsConfig, named: list[str], *, uses_transducers: bool) -> None:
    owned = {group for name in named for group in channel_group_names(name)}
    unknown = [group for group in features.channel_groups if group not in owned]
    if not unknown:
        return
    if not named:
        groups = [f.name for f in dataclasses.fields(FeatureGroupsConfig) if f.name != "channel_groups"]
        close = difflib.get_close_matches(unknown[0], groups, n=3)
        hint = f"; did you mean {', '.join('ranking.features.' + c for c in close)}?" if close else ""
        channels = "" if uses_transducers else " (a channel's groups need model.transducers naming the channel)"
        raise ConfigError(f"unknown key ranking.features.{unknown[0]}{hint} Groups: {', '.join(groups)}{channels}.")
    raise ConfigError(
        f"ranking.features.{unknown[0]} is not a group of any channel of model.transducers "
        f"({', '.join(named)}): a channel x reads {', '.join('x' + s for s in CHANNEL_GROUP_SUFFIXES)}"
    )


def _check_needed_groups(config, named: list[str]) -> None:
    groups = config.ranking.features.channel_groups
    thresholds = bool(config.ranking.action_encoder.watchtime_thresholds)
    missing = []
    for name in named:
        needed = [name, name + "_timestamp"]
        if thresholds and name + "_action" in groups:
            needed.append(name + "_watchtime")
        missing += [group for group in needed if group not in groups]
    if missing:
        raise ConfigError(
            f"ranking.features lacks the groups {', '.join(missing)} that the channels of model.transducers read "
            "(a channel x needs x: {feature: table} and x_timestamp; x_watchtime too with "
            "action_encoder.watchtime_thresholds)"
        )
    for name in named:
        require(
            isinstance(groups[name], dict) and len(groups[name]) > 0,
            f"ranking.features.{name} must map the channel's history features to tables, e.g. {{item_id: item}}",
        )
        for suffix in ("_action", "_watchtime", "_timestamp"):
            value = groups.get(name + suffix)
            require(
                value is None or isinstance(value, str),
                f"ranking.features.{name}{suffix} must name one column, got {value!r}",
            )


def _check_stores(config, channels: list[TransducerConfig], source) -> None:
    """Every channel's columns come from one event store of the data (a history)."""
    stores = SOURCE_EVENT_STORES.get(source)
    if source == "impressions":
        require(
            len(channels) == 1 and channels[0].name == "",
            "data.source=impressions reads one history (the uih groups): use one unnamed channel in "
            "model.transducers, or the synthetic or movielens data for several channels",
        )
        return
    if stores is None:
        return
    for channel in channels:
        features = channel_features(config.ranking.features, channel.name)
        columns = list(features.uih) + [c for c in (features.uih_action, features.uih_watchtime, features.uih_timestamp) if c]
        holders = [store for store, provided in stores.items() if all(c in provided for c in columns)]
        if not holders:
            offered = "; ".join(f"{store}: {', '.join(provided)}" for store, provided in stores.items())
            raise ConfigError(
                f"channel {channel.name or 'uih'} reads columns {', '.join(columns)}, which no history of the "
                f"{source} data holds together; its histories: {offered}"
            )


def _check_channel_layout(config, index: int, channel: TransducerConfig) -> None:
    """The channel's own stack fits the model's rules and the parallel layout."""
    where = f"model.transducers[{index}]" if config.model.transducers else "model"
    try:
        merged = dataclasses.replace(config.model, transducers=None, **channel.overrides())
    except ConfigError as error:
        raise ConfigError(f"{where} ({channel.name or 'unnamed'}): {error}") from None
    tp, pp = config.parallel.tensor_model_parallel_size, config.parallel.pipeline_model_parallel_size
    require(
        merged.num_attention_heads % tp == 0,
        f"{where}.num_attention_heads={merged.num_attention_heads} is not divisible by "
        f"parallel.tensor_model_parallel_size={tp}: each rank takes whole heads of every channel",
    )
    require(
        merged.num_layers % pp == 0,
        f"{where}.num_layers={merged.num_layers} is not divisible by parallel.pipeline_model_parallel_size={pp}: "
        "every pipeline stage holds an equal share of every channel's layers",
    )
