"""ULTRA-HSTU on one rank: one unnamed channel is DLRM-HSTU bit for bit on the same
weights (fp32, CPU); two channels of different widths feed the tower their summed width
and share one table; channels that disagree on the candidates fail clearly; the channel
data (the synthetic click channel, one numbering per table) against hand-computed values;
a short ULTRA run through the trainer evaluates."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from megatron_gr.config import ExperimentConfig
from megatron_gr.data.errors import DataFormatError
from megatron_gr.data.ranking.channel_batches import ChannelBatch, make_channel_batch
from megatron_gr.data.ranking.channels import EventStore, filtered_store
from megatron_gr.data.ranking.loader import make_batch
from megatron_gr.models.ranking.model import CandidateScores, DLRMHSTUModel
from megatron_gr.models.registry import StageRequest, get_train_spec
from megatron_gr.models.ultra.model import UltraHSTUModel
from megatron_gr.training.plan import make_plan
from megatron_gr.training.trainer import Trainer
from tests.unit.training.helpers import read_records

SYNTHETIC = {"num_users": 40, "num_items": 30, "num_topics": 3, "requests_per_user": 3, "candidates_per_request": 4,
             "min_warmup_requests": 1, "max_warmup_requests": 3, "seed": 2}
IMP = {"imp": {"item_id": "item", "item_topic": "topic"}, "imp_action": "action", "imp_watchtime": "watch_time",
       "imp_timestamp": "timestamp"}
CLICK = {"click": {"click_item_id": "item", "click_item_topic": "topic"}, "click_action": "click_action",
         "click_watchtime": "click_watch_time", "click_timestamp": "click_timestamp"}
TWO_CHANNELS = [{"name": "imp", "sla_k1": 4, "sla_k2": 3, "attn_truncation_split_layer": 1, "attn_truncation_tail_len": 3},
                {"name": "click", "hidden_size": 8, "num_attention_heads": 1, "num_layers": 2}]


def tiny(tmp_path, model=None, features=None) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "model": {"type": "ranking", "num_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "qk_head_dim": 8,
                  "v_head_dim": 8, "max_seq_len": 24, "hidden_dropout": 0.0, "embedding_dropout": 0.0,
                  "num_time_buckets": 32, "time_bucket_fn": "log", **(model or {})},
        "embeddings": {"item": {"dim": 8}, "topic": {"dim": 4}, "segment": {"dim": 4}, "activity": {"dim": 4}},
        "ranking": {"action_encoder": {"watchtime_thresholds": [5.0], "dim": 4, "mlp_hidden": 8},
                    "content_encoder": {"mlp_hidden": 8}, "tower": {"hidden_sizes": [8]},
                    "output_postprocessor": "timestamp_layernorm", "features": features or {}},
        "data": {"ranking": {"synthetic": SYNTHETIC}},
        "training": {"train_iters": 3, "micro_batch_size": 8, "global_batch_size": 16, "lr": 3e-3, "eval_interval": 0,
                     "device": "cpu", "eval_batch_size": 16, "lr_warmup_iters": 1},
        "logging": {"progress": "off", "metrics_file": str(tmp_path / "metrics.jsonl"), "log_interval": 1},
    })


def build(config):
    spec = get_train_spec("ranking")
    dataset = spec.build_dataset(config)
    plan = make_plan(config, table_rows=dataset.table_rows(), world_size=1)
    model = spec.build_stage(StageRequest(plan=plan, dataset=dataset, pre_process=True, post_process=True))
    return model, dataset


def ultra_key(name: str) -> str:
    """DLRM-HSTU's parameter name -> the unnamed channel's."""
    for prefix in ("decoder.", "preprocessor."):
        if name.startswith(prefix):
            return "channels.uih." + name
    return name


def test_one_unnamed_channel_is_dlrm_hstu_bit_for_bit(megatron_cpu, tmp_path):
    dropout = {"hidden_dropout": 0.2, "embedding_dropout": 0.2}  # keyed: the same masks in both
    dlrm, dataset = build(tiny(tmp_path, model=dropout))
    ultra, ultra_data = build(tiny(tmp_path, model={"transducers": [{}], **dropout}))
    assert isinstance(dlrm, DLRMHSTUModel) and isinstance(ultra, UltraHSTUModel)
    weights = dict(ultra.named_parameters())
    assert sorted(ultra_key(n) for n, _ in dlrm.named_parameters()) == sorted(weights)
    for name, value in dlrm.named_parameters():  # keyed initialisation: equal already; make sure
        assert torch.equal(weights[ultra_key(name)], value), name
    chunk, index = np.array([0, 3, 7, 11]), np.array([4, 0, 2, 9])  # samples, their places in a global batch
    plain = make_batch(dataset.data, dataset.layout, chunk, key_base=index * 24, dropout_seed=5)
    channels = make_channel_batch(ultra_data.channels, chunk, key_base=index, dropout_seed=5)
    assert torch.equal(channels.first.token_keys, plain.token_keys)
    for model in (dlrm, ultra):
        model.eval()
    with torch.no_grad():
        expected, actual = dlrm(plain), ultra(channels)
    assert torch.equal(actual.scores, expected.scores) and torch.equal(actual.labels, expected.labels)
    for model in (dlrm, ultra):
        model.train()
    dlrm(plain).sum().backward()
    ultra(channels).sum().backward()
    grads = {ultra_key(n): p.grad for n, p in dlrm.named_parameters()}
    for name, value in ultra.named_parameters():
        assert torch.equal(value.grad, grads[name]), name


def test_two_channels_of_different_widths_feed_the_tower_their_summed_width(megatron_cpu, tmp_path):
    model, dataset = build(tiny(tmp_path, model={"transducers": TWO_CHANNELS}, features={**IMP, **CLICK}))
    assert list(model.channels) == ["imp", "click"]
    assert model.postprocessor.width == 16 + 8 + 4  # the channels' widths and the time features
    assert sorted(model.tables) == ["activity", "item", "segment", "topic"]  # one item table for both channels
    seen = {}
    model.postprocessor.register_forward_hook(lambda module, args, out: seen.update(input=args[0]))
    batch = make_channel_batch(dataset.channels, np.array([0, 1, 2]))
    model.eval()
    with torch.no_grad():
        scores = model(batch)
    assert isinstance(scores, CandidateScores) and scores.scores.shape == (12, 3)
    assert seen["input"].shape == (12, 24)
    imp, click = batch.channels["imp"], batch.channels["click"]
    assert torch.equal(imp.candidate_ids, click.candidate_ids) and imp.num_tokens > click.num_tokens
    bad = ChannelBatch({"imp": imp, "click": make_batch(dataset.channels["click"].data, dataset.channels["click"].layout,
                                                        np.array([0, 1]))})
    with pytest.raises(DataFormatError, match=r"different numbers of candidate rows \(imp: 12, click: 8\)"):
        model(bad)


def test_a_filtered_channel_keeps_each_histories_kept_events():
    store = EventStore(np.array([0, 0, 3]), np.array([2, 3, 7]),
                       {"item": np.array([10, 11, 12, 20, 21, 22, 23]), "action": np.array([0, 1, 1, 1, 0, 0, 1])})
    clicked = filtered_store(store, store.events["action"] == 1, prefix="click_")
    assert clicked.events["click_item"].tolist() == [11, 12, 20, 23]
    assert clicked.history_begin.tolist() == [0, 0, 2] and clicked.history_end.tolist() == [1, 2, 4]


def test_channels_share_one_numbering_of_each_table(megatron_cpu, tmp_path):
    config = tiny(tmp_path, model={"transducers": TWO_CHANNELS}, features={**IMP, **CLICK})
    dataset = get_train_spec("ranking").build_dataset(config)
    imp, click = dataset.channels["imp"].data, dataset.channels["click"].data
    assert np.array_equal(imp.tables["item"].vocab, click.tables["item"].vocab)
    assert np.array_equal(imp.candidate_ids, click.candidate_ids)
    # a clicked event's item has the same dense id in both channels
    samples = imp.samples
    events = samples.events
    clicked = np.flatnonzero(events["action"] & 1)
    assert np.array_equal(click.history_ids[:, 0], imp.history_ids[clicked, 0])
    assert click.samples.history_lengths.sum() < samples.history_lengths.sum()


def test_ultra_trains_and_evaluates_through_the_trainer(megatron_cpu, tmp_path):
    config = tiny(tmp_path, model={"transducers": TWO_CHANNELS, "recompute_uvqk": True, "recompute_normed_x": True},
                  features={**IMP, **CLICK})
    trainer = Trainer(config)
    assert "events per history by channel: imp:" in trainer.dataset.describe()
    results = trainer.train()
    losses = [r["loss"] for r in read_records(config.logging.metrics_file)]
    assert len(losses) == 3 and all(np.isfinite(losses))
    for which in ("valid", "test"):
        assert 0.0 < results[which]["auc"] < 1.0 and results[which]["bayes_auc"] == pytest.approx(trainer.dataset.bayes_auc(which))


def test_a_first_stage_sends_the_shape_its_batch_declares(megatron_cpu, tmp_path):
    """Under PP=2 the first stage holds half of every channel's layers (channel imp
    truncates inside it) and sends one flat tensor: the size ``with_pipeline_shapes``
    declares for stage 0's send and stage 1's receive; the loader's host count of imp's kept
    tokens is right and gives what the device count gives."""
    from megatron_gr.models.ultra.spec import with_host_counts

    config = tiny(tmp_path, model={"transducers": [{**TWO_CHANNELS[0], "num_layers": 4}, TWO_CHANNELS[1]]},
                  features={**IMP, **CLICK})
    spec = get_train_spec("ranking")
    dataset = spec.build_dataset(config)
    plan = make_plan(config, table_rows=dataset.table_rows(), world_size=1)
    staged = dataclasses.replace(plan.model_config, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    names = list(config.embeddings)
    first = UltraHSTUModel(staged, config.ranking, dict(build(config)[0].tables.items()),
                           table_dims={n: config.embeddings[n].dim for n in names}, post_process=False, init_seed=1)
    assert [len(c.decoder.layers) for _, c in first.channels.items()] == [2, 1]
    batch = with_host_counts(make_channel_batch(dataset.channels, np.arange(5)), staged)
    sent = first.eval()(batch)
    imp, click = batch.channels["imp"], batch.channels["click"]
    kept = sum(min(int(h), 3) for h in (imp.offsets.diff() - imp.num_targets - 2))  # imp: truncated to 3 events
    expected = (2 * 5 + kept + imp.num_candidates) * 16 + click.num_tokens * 8  # click: whole
    assert sent.shape == (expected, 1, 1)
    assert batch.pipeline_shapes[0][1] == batch.pipeline_shapes[1][0] == (expected, 1, 1)
    assert batch.kept_tokens == {"imp": 2 * 5 + kept + imp.num_candidates}  # click does not truncate
    assert torch.equal(first(dataclasses.replace(batch, kept_tokens=None)), sent)
