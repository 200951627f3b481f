"""Every mistake in a ranking config is one ConfigError line naming it, before anything is
read or built."""

from __future__ import annotations

import copy

import pytest

from megatron_gr.config import ConfigError, ExperimentConfig, resolve_config

TABLES = {"item": {"dim": 32}, "topic": {"dim": 16}, "segment": {"dim": 8}, "activity": {"dim": 8}}


def ranking(**sections) -> dict:
    raw = {"model": {"type": "ranking"}, "embeddings": copy.deepcopy(TABLES)}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def with_features(**groups) -> dict:
    return ranking(ranking={"features": groups})


BAD = [
    # unknown group / column / label
    (with_features(uih_actions="action"), ["unknown key ranking.features.uih_actions", "ranking.features.uih_action"]),
    (with_features(uih={"video_id": "item"}), ["ranking.features.uih names column 'video_id'", "provides: item_id, item_topic"]),
    (with_features(contextual={"age": "segment"}), ["ranking.features.contextual names column 'age'", "segment"]),
    (with_features(uih_watchtime="watch_seconds"), ["ranking.features.uih_watchtime names column 'watch_seconds'"]),
    (with_features(uih={"item_id": "item", "cand_item_id": "item"}), ["column 'cand_item_id'"]),
    (with_features(uih={}), ["ranking.features.uih is empty"]),
    (with_features(uih=["item_id"]), ["ranking.features.uih=['item_id'] must be a mapping"]),
    (ranking(ranking={"tasks": [{"name": "click", "label": "clicked", "bitmask": 1}]}),
     ["ranking.tasks[click].label='clicked'", "labels: cand_action, cand_watch_time"]),
    # tables and widths
    (with_features(uih={"item_id": "items", "item_topic": "topic"}),
     ["ranking.features.uih.item_id is looked up in table 'items'", "add embeddings.items.dim"]),
    (with_features(candidate={"cand_item_id": "item"}),
     ["content_encoder.type=slice", "ranking.features.uih are 48 wide", "ranking.features.candidate 32"]),
    (ranking(embeddings={"unused": {"dim": 8}}), ["embeddings.unused is not used by any ranking feature"]),
    (ranking(model={"type": "ranking", "contextual_len": 3}), ["model.contextual_len=3", "(2: segment, activity)"]),
    (ranking(embeddings={"item": {"dim": 32, "type": "dynamic"}}, parallel={"pipeline_model_parallel_size": 2}),
     ["embeddings.item.type=dynamic", "pipeline_model_parallel_size=2", "not supported yet"]),
    (ranking(embeddings={"item": {"dim": 32, "type": "dynamic", "dynamic": {"pooling": "sum"}}}),
     ["embeddings.item.dynamic.pooling='sum'", "pooling=none"]),
    (ranking(model={"type": "ranking", "max_seq_len": 10}), ["model.max_seq_len=10 leaves no room", "use max_seq_len >= 11"]),
    # encoders, postprocessor, tower
    (ranking(ranking={"action_encoder": {"action_weights": [1, 3]}}), ["action_weights[1]=3 is not a power of two"]),
    (ranking(ranking={"action_encoder": {"action_weights": [2, 2]}}), ["repeats a bit"]),
    (ranking(ranking={"action_encoder": {"watchtime_thresholds": [5.0]}, "features": {"uih_watchtime": None}}),
     ["watchtime_thresholds needs ranking.features.uih_watchtime"]),
    (ranking(ranking={"content_encoder": {"type": "mlp"}}), ["ranking.content_encoder.type=mlp needs dim"]),
    (ranking(ranking={"content_encoder": {"dim": 8}}), ["ranking.content_encoder.dim=8 applies to type=mlp"]),
    (ranking(ranking={"content_encoder": {"type": "concat"}}), ["ranking.content_encoder.type='concat'", "'slice', 'mlp'"]),
    (ranking(ranking={"output_postprocessor": "l2norm"}), ["ranking.output_postprocessor='l2norm'", "'timestamp_layernorm'"]),
    (ranking(ranking={"time_period_units": [3600]}), ["time_period_units=[3600]", "one entry each"]),
    (ranking(ranking={"tower": {"hidden_sizes": [0]}}), ["hidden_sizes[0]=0", ">= 1"]),
    # tasks
    (ranking(ranking={"tasks": [{"name": "click", "label": "cand_action"}]}), ["ranking.tasks[0].bitmask is missing", "click"]),
    (ranking(ranking={"tasks": [{"name": "click", "label": "cand_action", "bitmask": 1},
                                {"name": "w", "type": "regression", "label": "cand_watch_time", "bitmask": 1}]}),
     ["ranking.tasks[1].bitmask=1 applies to binary tasks only"]),
    (ranking(ranking={"tasks": [{"name": "click", "label": "cand_action", "bitmask": 1},
                                {"name": "click", "label": "cand_action", "bitmask": 2}]}), ["name 'click' twice"]),
    (ranking(ranking={"tasks": [{"name": "w", "type": "regression", "label": "cand_watch_time"}]}), ["no binary task"]),
    (ranking(ranking={"tasks": [{"name": "click", "label": "cand_action", "bitmask": 1, "weight": 0}]}), ["all have weight 0"]),
    (ranking(ranking={"selection_task": "watch_time"}), ["selection_task='watch_time' is not a binary task", "click, like"]),
    (ranking(ranking={"tasks": [{"name": "a/b", "label": "cand_action", "bitmask": 1}]}), ["name='a/b' must not contain '/'"]),
    (ranking(ranking={"tasks": [{"name": "click", "type": "ordinal", "label": "cand_action"}]}),
     ["ranking.tasks[0].type='ordinal'", "'binary', 'regression'"]),
    # model settings the ranking model does not build
    (ranking(model={"type": "ranking", "block_type": "transformer", "contextual_len": 0}), ["model.block_type='transformer'"]),
    (ranking(model={"type": "ranking", "time_bias_origin": "query"}), ["model.time_bias_origin='query'", "token"]),
    (ranking(model={"type": "ranking", "time_feature": "until_query"}), ["model.time_feature='until_query'", "retrieval"]),
    (ranking(model={"type": "ranking", "output_normalization": "none"}), ["model.output_normalization='none'"]),
    # FP8 (the ranking models run it: tests/unit/training/test_fp8_ranking_training.py)
    (ranking(model={"type": "ranking", "fp8": "hybrid", "recompute_uvqk": True}),
     ["model.recompute_uvqk with model.fp8_recipe='delayed'", "tensorwise or rowwise"]),
    (ranking(model={"type": "ranking", "fp8": "hybrid", "transducers": [{"hidden_size": 24, "num_attention_heads": 1}]}),
     ["model.transducers[0] (unnamed) with model.fp8='hybrid'", "hidden_size = 24 is not a multiple of 16"]),
    # sources and sections
    (ranking(data={"source": "prepared", "path": "x"}), ["data.source='prepared' holds retrieval sequences"]),
    ({"data": {"source": "impressions", "path": "x.csv"}}, ["data.source='impressions' holds ranking samples"]),
    ({"ranking": {"use_history": False}}, ["the ranking section configures the ranking model", "model.type=ranking"]),
    (ranking(data={"ranking": {"num_candidates": 0}}), ["data.ranking.num_candidates=0", ">= 1"]),
    (ranking(data={"ranking": {"sequence_delimiter": ","}}), ["data.ranking.sequence_delimiter=','"]),
    (ranking(data={"ranking": {"synthetic": {"requests_per_user": 2}}}), ["data.ranking.synthetic.requests_per_user=2", ">= 3"]),
]


@pytest.mark.parametrize("raw, words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_ranking_config_is_one_clear_line(raw, words):
    with pytest.raises(ConfigError) as caught:
        ExperimentConfig.from_dict(raw)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_fp8_ranking_config_builds():
    config = ExperimentConfig.from_dict(ranking(model={"type": "ranking", "fp8": "hybrid", "fp8_recipe": "tensorwise",
                                                       "recompute_uvqk": True}))
    assert config.model.fp8 == "hybrid"


def test_a_transformer_engine_only_recipe_is_refused_for_the_ranking_tower(monkeypatch):
    """With Transformer Engine installed megatron takes its recipes; the tower's native FP8
    linears take three of them."""
    from megatron_gr.config import fp8_validation

    monkeypatch.setattr(fp8_validation, "transformer_engine_available", lambda: True)
    with pytest.raises(ConfigError) as caught:
        ExperimentConfig.from_dict(ranking(model={"type": "ranking", "fp8": "hybrid", "fp8_recipe": "mxfp8"}))
    assert str(caught.value) == (
        "model.fp8_recipe='mxfp8' with model.type=ranking: the ranking tower's FP8 linears are the native ones, "
        "which take delayed, tensorwise beside Transformer Engine; choose one of those or unset model.fp8"
    )


def test_movielens_columns_are_checked_before_reading():
    raw = ranking(data={"source": "movielens", "path": "/nowhere"})  # the synthetic features
    with pytest.raises(ConfigError, match="ranking.features.contextual names column 'segment', which the movielens"):
        ExperimentConfig.from_dict(raw)


def test_auto_source_is_told_from_the_path(tmp_path):
    """No path: synthetic; MovieLens ratings: movielens; any other file: an impression CSV
    (whose header its reader checks); a prepared or unknown directory: an error at read time."""
    from megatron_gr.data import DataFormatError
    from megatron_gr.data.ranking.source import resolve_ranking_source

    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "u.data").write_text("1\t2\t3\t4\n")
    (tmp_path / "kuairand.csv").write_text("user_id\n")
    assert resolve_ranking_source("auto", None) == "synthetic"
    assert resolve_ranking_source("auto", tmp_path / "ml") == "movielens"
    assert resolve_ranking_source("auto", tmp_path / "kuairand.csv") == "impressions"
    assert resolve_ranking_source("impressions", tmp_path / "ml") == "impressions"  # named: as it is
    with pytest.raises(DataFormatError, match="cannot tell what ranking data the directory"):
        resolve_ranking_source("auto", tmp_path)
    with pytest.raises(FileNotFoundError):
        resolve_ranking_source("auto", tmp_path / "missing.csv")
    # the config checks the columns of the source the path resolves to
    with pytest.raises(ConfigError, match="which the movielens data set does not provide"):
        ExperimentConfig.from_dict(ranking(data={"path": str(tmp_path / "ml")}))
    assert ExperimentConfig.from_dict(ranking()).data.source == "auto"  # synthetic, no path


def test_defaults_fill_contextual_len_and_round_trip():
    config = ExperimentConfig.from_dict(ranking())
    assert config.model.contextual_len == 2  # one token per contextual feature
    assert config.ranking.selection_task == "click" and config.ranking.selection_index == 0
    assert "item" in config.embeddings and set(config.embeddings) == set(TABLES)
    again = ExperimentConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    retrieval = ExperimentConfig.from_dict({})
    assert "ranking" not in retrieval.to_dict() and set(retrieval.embeddings) == {"item"}


def test_shipped_configs_resolve(tmp_path):
    config = resolve_config("configs/dlrm_hstu_synthetic.yaml")
    assert config.model.type == "ranking" and config.data.source == "synthetic"
    ml = resolve_config("configs/dlrm_hstu_ml100k.yaml", [(["data", "path"], str(tmp_path))])
    assert ml.data.source == "movielens" and ml.ranking.tasks[0].bitmask == 24
