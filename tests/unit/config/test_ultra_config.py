"""Every rule of ULTRA-HSTU's config (``model.transducers``, truncation, rematerialization)
is one ConfigError line naming it, raised when the config loads."""

from __future__ import annotations

import copy

import pytest

from megatron_gr.config import ConfigError, ExperimentConfig

TABLES = {"item": {"dim": 32}, "topic": {"dim": 16}, "segment": {"dim": 8}, "activity": {"dim": 8}}
IMP = {"imp": {"item_id": "item", "item_topic": "topic"}, "imp_action": "action", "imp_watchtime": "watch_time",
       "imp_timestamp": "timestamp"}
CLICK = {"click": {"click_item_id": "item", "click_item_topic": "topic"}, "click_action": "click_action",
         "click_watchtime": "click_watch_time", "click_timestamp": "click_timestamp"}


def config(transducers=None, groups=None, model=None, parallel=None, data=None, ranking=None) -> dict:
    raw = {"model": {"type": "ranking", "num_layers": 2, **(model or {})}, "embeddings": copy.deepcopy(TABLES),
           "ranking": {"features": {**IMP, **CLICK} if groups is None else groups, **(ranking or {})}}
    if transducers is not None:
        raw["model"]["transducers"] = transducers
    if parallel:
        raw["parallel"] = parallel
    if data:
        raw["data"] = data
    return raw


TWO = [{"name": "imp"}, {"name": "click", "hidden_size": 32}]

BAD = [
    # the channel list
    (config([], groups={}), "model.transducers=[] has no channel: give at least one"),
    (config([{"name": "imp"}, {}]), "model.transducers[1].name is empty: with 2 channels every channel needs a name"),
    (config([{"name": "imp"}, {"name": "imp"}]), "model.transducers name channel 'imp' twice"),
    (config([{"name": "uih"}, {"name": "click"}]), "model.transducers[0].name='uih' is reserved"),
    (config([{"name": "candidate"}, {"name": "click"}]), "model.transducers[0].name='candidate' is reserved"),
    (config([{"name": "contextual"}, {"name": "click"}]), "model.transducers[0].name='contextual' is reserved"),
    (config([{"name": "imp"}, {"name": "search_action"}]), "model.transducers[1].name='search_action' ends in '_action'"),
    (config([{"name": "imp"}, {"name": "long_watchtime"}]), "ends in '_watchtime'"),
    (config([{"name": "imp"}, {"name": "x_timestamp"}]), "ends in '_timestamp'"),
    (config([{"name": "imp"}, {"name": "9lives"}]), "model.transducers[1].name='9lives' is not a valid channel name"),
    (config([{"name": "imp"}, {"name": "a-b"}]), "model.transducers[1].name='a-b' is not a valid channel name"),
    # the groups the channels read: every missing one in one line
    (config([{"name": "imp"}, {"name": "search"}, {"name": "shop"}], groups=IMP),
     "ranking.features lacks the groups search, search_timestamp, shop, shop_timestamp"),
    (config(TWO, groups={**IMP, **CLICK, "clicks_action": "click_action"}),
     "ranking.features.clicks_action is not a group of any channel of model.transducers (imp, click)"),
    (config(None, groups={**IMP}), "unknown key ranking.features.imp"),
    (config(TWO, groups={**IMP, **{**CLICK, "click": {"click_item_id": "items"}}}),
     "ranking.features.click.click_item_id is looked up in table 'items'"),
    (config(TWO, groups={**IMP, **{**CLICK, "click": {"item_id": "item", "click_item_topic": "topic"}}}),
     "channel click reads columns item_id, click_item_topic"),
    (config([{}], data={"source": "impressions", "path": "x.csv"}, groups={}), None),  # one unnamed channel: fine
    (config(TWO, data={"source": "impressions", "path": "x.csv"}), "data.source=impressions reads one history"),
    # truncation
    (config(None, groups={}, model={"attn_truncation_split_layer": 2, "attn_truncation_tail_len": 8}),
     "model.attn_truncation_split_layer=2 must be smaller than the channel's num_layers=2"),
    (config(None, groups={}, model={"attn_truncation_split_layer": 1}),
     "model.attn_truncation_tail_len=0: truncation after layer 1 needs the history events to keep"),
    (config(None, groups={}, model={"attn_truncation_tail_len": 8}),
     "model.attn_truncation_tail_len=8 has no effect without model.attn_truncation_split_layer"),
    (config([{"name": "imp", "attn_truncation_split_layer": 3, "attn_truncation_tail_len": 4}, {"name": "click"}]),
     "model.transducers[0] (imp): model.attn_truncation_split_layer=3 must be smaller than the channel's num_layers=2"),
    # rematerialization, model type, layout
    (config(None, groups={}, model={"recompute_normed_x": True, "enable_hyper_connections": True}),
     "recompute_normed_x=True with enable_hyper_connections=True"),
    ({"model": {"type": "retrieval", "recompute_uvqk": True}}, "model.recompute_uvqk=True applies to the ranking model"),
    ({"model": {"type": "retrieval", "transducers": [{}]}}, "model.transducers="),
    (config([{"name": "imp", "num_attention_heads": 3}, {"name": "click"}], parallel={"tensor_model_parallel_size": 2}),
     "model.transducers[0].num_attention_heads=3 is not divisible by parallel.tensor_model_parallel_size=2"),
    (config([{"name": "imp"}, {"name": "click", "num_layers": 3}], parallel={"pipeline_model_parallel_size": 2}),
     "model.transducers[1].num_layers=3 is not divisible by parallel.pipeline_model_parallel_size=2"),
]


@pytest.mark.parametrize("raw, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_ultra_config_mistake_is_one_line(raw, message):
    if message is None:
        ExperimentConfig.from_dict(raw)
        return
    with pytest.raises(ConfigError) as error:
        ExperimentConfig.from_dict(raw)
    text = str(error.value)
    assert message in text and "\n" not in text


def test_two_channels_load_and_round_trip():
    loaded = ExperimentConfig.from_dict(config(TWO))
    assert [t.name for t in loaded.model.transducers] == ["imp", "click"] and loaded.model.uses_transducers
    assert loaded.ranking.features.channel_groups["click_timestamp"] == "click_timestamp"
    again = ExperimentConfig.from_dict(loaded.to_dict())
    assert again.model.transducers == loaded.model.transducers
    assert again.ranking.features.channel_groups == loaded.ranking.features.channel_groups


def test_truncation_or_rematerialization_alone_runs_ultra_with_one_unnamed_channel():
    plain = ExperimentConfig.from_dict(config(None, groups={}))
    assert not plain.model.uses_transducers
    for model in ({"recompute_uvqk": True}, {"attn_truncation_split_layer": 1, "attn_truncation_tail_len": 4}):
        assert ExperimentConfig.from_dict(config(None, groups={}, model=model)).model.uses_transducers
