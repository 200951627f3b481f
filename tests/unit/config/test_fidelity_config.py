"""The retrieval-quality options (encodings, loss, scores, layers, training windows): each
bad value is one clear line, and the accepted ones round-trip through a config file."""

from __future__ import annotations

import pytest

from megatron_gr.config import ConfigError, ExperimentConfig

BAD = [
    ({"model": {"time_feature": "future"}}, ["model.time_feature='future'", "'since_previous', 'until_query', 'none'"]),
    ({"model": {"time_bias_origin": "next"}}, ["model.time_bias_origin='next'", "'token', 'query'"]),
    ({"model": {"position_encoding": "rotary"}}, ["model.position_encoding='rotary'", "'from_start'"]),
    ({"model": {"scale_item_embeddings": "yes"}}, ["model.scale_item_embeddings='yes'", "true or false"]),
    ({"model": {"retrieval_loss": "bce"}}, ["model.retrieval_loss='bce'", "'sampled_softmax', 'full_softmax'"]),
    ({"model": {"output_normalization": "layer"}}, ["model.output_normalization='layer'", "'l2', 'none'"]),
    ({"model": {"block_type": "mamba"}}, ["model.block_type='mamba'", "'stu', 'transformer'"]),
    ({"model": {"block_type": "transformer", "sla_k1": 4}}, ["sla_k1=4 applies to STU layers only"]),
    ({"model": {"attention_dropout": 1.5, "block_type": "transformer"}}, ["model.attention_dropout=1.5", "[0, 1)"]),
    ({"data": {"train_windows": "first"}}, ["data.train_windows='first'", "'latest', 'all'"]),
]


@pytest.mark.parametrize("raw, words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_option_is_one_clear_line(raw, words):
    with pytest.raises(ConfigError) as caught:
        ExperimentConfig.from_dict(raw)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_options_round_trip():
    raw = {
        "model": {"time_feature": "until_query", "time_bias_origin": "query", "time_bucket_fn": "hstu_log",
                  "position_encoding": "from_end", "scale_item_embeddings": False, "retrieval_loss": "full_softmax",
                  "output_normalization": "none", "block_type": "transformer", "attention_dropout": 0.2},
        "data": {"train_windows": "all"},
    }
    config = ExperimentConfig.from_dict(raw)
    again = ExperimentConfig.from_dict(config.to_dict())
    for key, value in raw["model"].items():
        assert getattr(again.model, key) == value
    assert again.data.train_windows == "all"
