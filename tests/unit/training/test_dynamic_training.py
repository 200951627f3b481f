"""The HSTU model with a dynamic item table: raw ids flow in, training resumes bit for bit
(best weights included), hyper-connections train with it, and 2 data-parallel ranks train
as 1 does (default balancing, which cuts their global batches differently)."""

from __future__ import annotations

import math

import pytest

from megatron_gr.training.trainer import Trainer
from tests.support.multirank import run_ranks
from tests.unit.training.helpers import dynamic_training_config, read_records, tiny_config

DYNAMIC = {"item": {"type": "dynamic", "dynamic": {"capacity": 512, "bucket_size": 16}}}


def test_raw_ids_reach_the_dynamic_table(megatron_cpu, tmp_path):
    trainer = Trainer(tiny_config(tmp_path, embeddings=DYNAMIC))
    vocab = trainer.dataset.items.vocab
    batch = trainer.loader.next_step()[0]
    assert batch.item_ids.max() > trainer.dataset.num_items  # raw ids (up to 2^40), not dense ones
    assert set(batch.labels.tolist()) <= set(vocab[1:].tolist())
    model = trainer.model[0].module
    assert model.corpus_ids.tolist() == vocab[1:].tolist()


def test_dynamic_table_training_resumes_bit_for_bit(megatron_cpu, tmp_path):
    """Rows, optimizer state, scores and best weights survive a save and a load: the resumed
    run's losses and final (best-weights) metrics equal the uninterrupted run's."""
    training = {"eval_interval": 2}
    straight = tiny_config(tmp_path / "straight", embeddings=DYNAMIC, training=training)
    expected_results = Trainer(straight).train()
    expected = read_records(straight.logging.metrics_file)

    ckpt = str(tmp_path / "ckpt")
    first = tiny_config(tmp_path / "resumed", embeddings=DYNAMIC, training={**training, "train_iters": 3}, checkpoint={"save": ckpt})
    Trainer(first).train()
    second = tiny_config(tmp_path / "resumed", embeddings=DYNAMIC, training=training, checkpoint={"save": ckpt, "load": ckpt})
    trainer = Trainer(second)
    assert trainer.state.iteration == 3 and trainer.sparse.tables[0].step == 3
    results = trainer.train()
    resumed = read_records(second.logging.metrics_file)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in expected]
    assert results["valid"] == expected_results["valid"] and results["test"] == expected_results["test"]
    assert resumed[-1]["embedding/item/occupancy"] == expected[-1]["embedding/item/occupancy"]
    assert expected[-1]["embedding/item/inserts"] > 0 and expected[-1]["embedding/item/lookups"] > 0


def test_dynamic_table_with_hyper_connections_trains(megatron_cpu, tmp_path):
    model = {"enable_hyper_connections": True, "num_residual_streams": 3, "mhc_init_gating_factor": 0.1}
    config = tiny_config(tmp_path, model=model, embeddings=DYNAMIC, training={"train_iters": 3, "eval_interval": 3})
    trainer = Trainer(config)
    results = trainer.train()
    losses = [r["loss"] for r in read_records(config.logging.metrics_file)]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    assert trainer.sparse.tables[0].step == 3 and 0.0 <= results["test"]["ndcg@10"] <= 1.0


@pytest.mark.slow
def test_two_data_parallel_ranks_train_as_one(megatron_cpu, tmp_path):
    one = dynamic_training_config(tmp_path, 1)
    Trainer(one).train()
    run_ranks(2, "tests.unit.training.helpers:train_dynamic", tmp_path, workdir=tmp_path)
    two = dynamic_training_config(tmp_path, 2)
    single, double = read_records(one.logging.metrics_file), read_records(two.logging.metrics_file)
    assert [r["loss"] for r in double] == pytest.approx([r["loss"] for r in single], rel=1e-6)
    valid_one, valid_two = read_records(one.logging.metrics_file, "valid"), read_records(two.logging.metrics_file, "valid")
    assert [r["ndcg@10"] for r in valid_two] == pytest.approx([r["ndcg@10"] for r in valid_one], rel=1e-4)
    assert double[-1]["embedding/item/occupancy"] == single[-1]["embedding/item/occupancy"]
