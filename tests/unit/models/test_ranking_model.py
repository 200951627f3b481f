"""The DLRM-HSTU model and its TrainSpec on one rank: a candidate's score depends on its
user's contextual features and history and on itself, never on another candidate; the
training output is the weighted task loss of each candidate; the ranking spec trains,
evaluates and describes the Bayes AUC; num_targets survives the sequence-parallel
padding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from megatron_gr.config import ExperimentConfig
from megatron_gr.data.ranking.loader import make_batch
from megatron_gr.models.ranking.model import CandidateScores
from megatron_gr.models.ranking.tower import task_losses
from megatron_gr.models.registry import StageRequest, get_train_spec, registered_types
from megatron_gr.training.plan import make_plan
from megatron_gr.training.trainer import Trainer
from megatron_gr.transformer.sequence_parallel import TokenSplit
from tests.unit.training.helpers import read_records

SYNTHETIC = {"num_users": 40, "num_items": 30, "num_topics": 3, "requests_per_user": 3, "candidates_per_request": 4,
             "min_warmup_requests": 1, "max_warmup_requests": 3, "seed": 2}


def tiny(tmp_path, **ranking) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "model": {"type": "ranking", "num_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "qk_head_dim": 8,
                  "v_head_dim": 8, "max_seq_len": 24, "hidden_dropout": 0.0, "embedding_dropout": 0.0,
                  "num_time_buckets": 32, "time_bucket_fn": "log"},
        "embeddings": {"item": {"dim": 8}, "topic": {"dim": 4}, "segment": {"dim": 4}, "activity": {"dim": 4}},
        "ranking": {"action_encoder": {"watchtime_thresholds": [5.0], "dim": 4, "mlp_hidden": 8},
                    "content_encoder": {"mlp_hidden": 8}, "tower": {"hidden_sizes": [8]},
                    "output_postprocessor": "timestamp_layernorm", **ranking},
        "data": {"ranking": {"synthetic": SYNTHETIC}},
        "training": {"train_iters": 3, "micro_batch_size": 8, "global_batch_size": 16, "lr": 3e-3, "eval_interval": 0,
                     "device": "cpu", "eval_batch_size": 16},
        "logging": {"progress": "off", "metrics_file": str(tmp_path / "metrics.jsonl"), "log_interval": 1},
    })


def build(config):
    spec = get_train_spec("ranking")
    dataset = spec.build_dataset(config)
    plan = make_plan(config, table_rows=dataset.table_rows(), world_size=1)
    model = spec.build_stage(StageRequest(plan=plan, dataset=dataset, pre_process=True, post_process=True))
    return model, dataset


def batch_of(dataset, samples, *, keyed=False):
    """``keyed``: with the dropout keys a training batch carries."""
    samples = np.asarray(samples)
    key_base = np.arange(samples.size) * dataset.layout.max_seq_len if keyed else None
    return make_batch(dataset.data, dataset.layout, samples, key_base=key_base, dropout_seed=7)


def test_ranking_is_a_registered_model_type():
    assert "ranking" in registered_types()
    spec = get_train_spec("ranking")
    assert spec.selection_metric == "auc" and spec.headline_metrics[:2] == ("auc", "gauc")


def test_a_candidate_sees_its_history_and_itself_but_no_other_candidate(megatron_cpu, tmp_path):
    model, dataset = build(tiny(tmp_path))
    model.eval()
    batch = batch_of(dataset, [0, 5])
    with torch.no_grad():
        base = model(batch)
    assert isinstance(base, CandidateScores) and base.scores.shape == (8, 3)

    other = dataclasses.replace(batch, candidate_ids=batch.candidate_ids.clone())
    other.candidate_ids[1] = other.candidate_ids[2]  # user 0's second candidate changes
    with torch.no_grad():
        changed = model(other).scores
    assert torch.equal(changed[[0, 2, 3, 4, 5, 6, 7]], base.scores[[0, 2, 3, 4, 5, 6, 7]])  # bitwise
    assert (changed[1] - base.scores[1]).abs().max() > 1e-6

    history = dataclasses.replace(batch, history_actions=batch.history_actions.clone())
    history.history_actions[0] ^= 1  # the first user's oldest event flips its click
    with torch.no_grad():
        moved = model(history).scores
    assert ((moved[:4] - base.scores[:4]).abs().amax(dim=1) > 1e-7).all()  # the first user's candidates see it
    assert torch.equal(moved[4:], base.scores[4:])  # the other user's do not


def test_training_output_is_the_weighted_loss_of_each_candidate(megatron_cpu, tmp_path):
    config = tiny(tmp_path)
    model, dataset = build(config)
    batch = batch_of(dataset, [1, 2, 3], keyed=True)
    model.eval()
    with torch.no_grad():
        scores = model(batch).scores.double()
    model.train()
    losses = model(batch)  # no dropout: the same forward pass
    outputs = torch.stack([torch.logit(scores[:, 0]), torch.logit(scores[:, 1]), scores[:, 2]], dim=1)
    expected = task_losses(outputs, batch.labels, config.ranking.tasks)
    assert losses.shape == (batch.num_candidates,)
    assert torch.allclose(losses.double(), expected.double(), rtol=1e-4, atol=1e-5)
    losses.sum().backward()
    assert model.tables["item"].weight.grad.abs().sum() > 0


def test_dropout_masks_follow_the_tokens_not_the_batch(megatron_cpu, tmp_path):
    """With dropout on the inputs, the STU layers and the tower, a sample's candidate losses
    are the same alone as inside a larger micro-batch when its tokens keep their keys (as
    on every parallel layout), and change with the step's seed."""
    config = tiny(tmp_path, tower={"hidden_sizes": [8], "dropout": 0.3})
    config.model.hidden_dropout = config.model.embedding_dropout = 0.3
    model, dataset = build(config)
    model.train()
    together = batch_of(dataset, [1, 2, 3], keyed=True)
    alone = make_batch(dataset.data, dataset.layout, np.asarray([2]), key_base=np.asarray([dataset.layout.max_seq_len]),
                       dropout_seed=7)
    with torch.no_grad():
        mixed = model(together)
        single = model(alone)
        reseeded = model(dataclasses.replace(alone, dropout_seed=8))
    mine = slice(4, 8)  # sample 2's 4 candidates
    assert torch.allclose(single, mixed[mine], rtol=1e-5, atol=1e-6)
    assert (reseeded - single).abs().max() > 1e-4
    model.eval()
    with torch.no_grad():
        assert (model(alone).scores - model(alone).scores).abs().max() == 0  # no dropout in evaluation


def test_without_history_the_sequence_is_contextual_and_candidates(megatron_cpu, tmp_path):
    model, dataset = build(tiny(tmp_path, use_history=False))
    batch = batch_of(dataset, [0])
    assert batch.history_index.numel() == 0 and batch.num_tokens == 2 + 4
    model.eval()
    with torch.no_grad():
        assert model(batch).scores.shape == (4, 3)


def test_sequence_parallel_padding_has_no_targets():
    split = TokenSplit(num_tokens=7, padding=1, group=None)
    params = split.seq_params(torch.tensor([0, 4, 7]), 4, timestamps=torch.arange(7), num_targets=torch.tensor([2, 1]))
    assert params.offsets.tolist() == [0, 4, 7, 8] and params.num_targets.tolist() == [2, 1, 0]
    plain = TokenSplit(num_tokens=7, padding=0, group=None).seq_params(torch.tensor([0, 7]), 7, num_targets=torch.tensor([3]))
    assert plain.num_targets.tolist() == [3]


def test_ranking_trains_and_reports_auc_gauc_and_the_bayes_auc(megatron_cpu, tmp_path):
    config = tiny(tmp_path)
    trainer = Trainer(config)
    assert "Bayes AUC of the planted model on test" in trainer.dataset.describe()
    results = trainer.train()
    records = read_records(config.logging.metrics_file)
    assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)
    for which in ("valid", "test"):
        metrics = results[which]
        assert 0.0 <= metrics["auc"] <= 1.0 and metrics["auc"] == metrics["click/auc"]
        assert metrics["bayes_auc"] == pytest.approx(trainer.dataset.bayes_auc(which))
        assert {"click/gauc", "like/logloss", "watch_time/mse", "click/gauc_skipped_users"} <= metrics.keys()


def test_preprocessor_puts_each_token_where_the_batch_says(megatron_cpu, tmp_path):
    """Token by token against the formulas: contextual f = W_f e_f(x_f) + b_f; history =
    content MLP + action MLP(bits, watch time) + position + time; candidate = content MLP +
    action MLP(candidate embedding) + position 0 + time."""
    model, dataset = build(tiny(tmp_path))
    pre, tables = model.preprocessor, model.tables
    batch = batch_of(dataset, [0, 7])
    with torch.no_grad():
        x = pre(batch, tables).squeeze(1)
        assert x.shape == (batch.num_tokens, 16)
        c = pre.contextual_projections
        for b in range(2):
            for f, name in enumerate(("segment", "activity")):
                token = c[f](tables[name](batch.contextual_ids[b, f]))
                assert torch.allclose(x[batch.contextual_index[2 * b + f]], token, atol=1e-6)

        def content(ids):
            return pre.content_mlp(torch.cat([tables["item"](ids[0]), tables["topic"](ids[1])]))

        def encodings(position, gap):
            return pre.encodings.position_embedding.weight[position] + pre.encodings.time_embedding.weight[
                int(np.floor(np.log2(gap + 1)))]

        for h in (0, 5, batch.history_index.numel() - 1):
            bits = [float(int(batch.history_actions[h]) & w != 0) for w in (1, 2)] + [float(batch.history_watchtimes[h] >= 5.0)]
            action = pre.action_mlp(torch.tensor(bits) @ pre.action_encoder.embeddings)
            expected = content(batch.history_ids[h]) + action + encodings(int(batch.history_positions[h]), int(batch.history_gaps[h]))
            assert torch.allclose(x[batch.history_index[h]], expected, atol=1e-5)
        for n in range(batch.num_candidates):
            action = pre.action_mlp(pre.action_encoder.candidate_embedding)
            expected = content(batch.candidate_ids[n]) + action + encodings(0, int(batch.candidate_gaps[n]))
            assert torch.allclose(x[batch.candidate_index[n]], expected, atol=1e-5)
