"""One lookup for several id tensors (the retrieval model's inputs, labels and negatives):
the rows and the trained rows of a lookup each, from one dedupe, the one host read of a
training lookup on one rank."""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig

from megatron_gr.embeddings.dynamic import DynamicEmbedding, DynamicEmbeddingCollection, exchange
from megatron_gr.training.trainer import Trainer
from tests.unit.embeddings.test_dynamic_collection import config
from tests.unit.training.helpers import tiny_config

CPU = torch.device("cpu")
# Overlapping parts, repeats inside each: history, labels, negatives.
IDS = [
    torch.tensor([[5, 9, 2**41, 5], [7, 9, -3, 11]], dtype=torch.int64),
    torch.tensor([9, 11, 12, 5, 5], dtype=torch.int64),
    torch.tensor([2**41, 12, 40, 41, 40, 7], dtype=torch.int64),
]


def _embedding() -> DynamicEmbedding:
    collection = DynamicEmbeddingCollection({"item": config(dim=4, optimizer="adam", lr=0.1)}, default_seed=4, device=CPU)
    model_config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1)
    return DynamicEmbedding(model_config, collection, "item")


def _counting(monkeypatch) -> list[int]:
    calls = []
    real = exchange.sorted_groups

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(exchange, "sorted_groups", counted)
    monkeypatch.setattr("megatron_gr.embeddings.dynamic.table.sorted_groups", counted)
    return calls


def _train_once(embedding: DynamicEmbedding, together: bool) -> list[torch.Tensor]:
    embedding.train()
    rows = embedding.lookup_many(IDS) if together else [embedding(ids) for ids in IDS]
    weights = torch.Generator().manual_seed(0)
    loss = sum((part * torch.randn(part.shape, generator=weights)).sum() for part in rows)
    loss.backward()
    table = embedding.collection.tables["item"]
    table.apply_step(dense_lr=0.0)
    return rows


def test_one_lookup_gives_the_rows_and_updates_of_one_each(monkeypatch):
    calls = _counting(monkeypatch)
    separate, together = _embedding(), _embedding()
    rows_separate = _train_once(separate, together=False)
    assert len(calls) == 4  # a dedupe per lookup, and one to sum the three lookups' row gradients
    calls.clear()
    rows_together = _train_once(together, together=True)
    assert len(calls) == 1
    for a, b, ids in zip(rows_separate, rows_together, IDS):
        assert b.shape == (*ids.shape, 4) and torch.equal(a, b)
    separate.eval(), together.eval()
    everything = torch.cat([ids.reshape(-1) for ids in IDS])
    with torch.no_grad():
        trained_separate, trained_together = separate(everything), together(everything)
    assert not torch.equal(trained_together, torch.cat([r.detach().reshape(-1, 4) for r in rows_together]))  # it trained
    # The same sums in another order: equal to float32 rounding of the gradients.
    torch.testing.assert_close(trained_together, trained_separate, rtol=1e-6, atol=1e-7)


def test_a_training_step_looks_up_once_per_micro_batch(megatron_cpu, tmp_path, monkeypatch):
    embeddings = {"item": {"type": "dynamic", "dynamic": {"capacity": 512, "bucket_size": 16}}}
    trainer = Trainer(tiny_config(tmp_path, embeddings=embeddings))
    lookups = []
    real = exchange.dedupe

    def counted(hashes, *args, **kwargs):
        lookups.append(hashes.numel())
        return real(hashes, *args, **kwargs)

    monkeypatch.setattr(exchange, "dedupe", counted)
    trainer.train_step()
    micro_batches = trainer.config.training.global_batch_size // trainer.config.training.micro_batch_size
    assert micro_batches == 2 and len(lookups) == micro_batches
