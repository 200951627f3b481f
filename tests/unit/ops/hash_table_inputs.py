"""Inputs of the hash-table probe tests: an empty table's slot arrays and random distinct
queries in the order the probe expects (sorted by routing key)."""

from __future__ import annotations

import torch

from megatron_gr.ops.pytorch.id_hash import routing_keys


def empty_table(num_buckets: int, bucket_size: int) -> dict[str, torch.Tensor]:
    capacity = num_buckets * bucket_size
    return {
        "keys": torch.zeros(capacity, dtype=torch.int64),
        "tags": torch.zeros(capacity, dtype=torch.int32),
        "last_seen": torch.full((capacity,), -1, dtype=torch.int64),
        "freq": torch.zeros(capacity, dtype=torch.int64),
        "changed": torch.zeros(capacity, dtype=torch.uint8),
    }


def random_queries(generator: torch.Generator, count: int, id_space: int = 50):
    """Distinct (id, tag) pairs sorted by routing key, with counts and insert flags."""
    ids = torch.randint(0, id_space, (count,), generator=generator)
    tags = torch.randint(0, 2, (count,), generator=generator).to(torch.int32)
    pairs = torch.unique(torch.stack([ids, tags.to(torch.int64)], dim=1), dim=0)
    ids, tags = pairs[:, 0].contiguous(), pairs[:, 1].to(torch.int32)
    hashes = routing_keys(ids, tags)
    order = torch.argsort(hashes)
    counts = torch.randint(1, 4, (ids.numel(),), generator=generator)
    may_insert = torch.rand(ids.numel(), generator=generator) < 0.8
    return ids[order], tags[order], hashes[order], counts, may_insert
