"""Builds one embedding table of a model from its config section."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.transformer import TransformerConfig

from megatron_gr.config.embedding_config import EmbeddingTableConfig
from megatron_gr.embeddings.base import EmbeddingTable
from megatron_gr.embeddings.dynamic import DynamicEmbedding, DynamicEmbeddingCollection
from megatron_gr.embeddings.plain import PlainEmbedding
from megatron_gr.ops.backend import KernelBackend
from megatron_gr.seeding import keyed_init


def build_table(
    name: str,
    table: EmbeddingTableConfig,
    model_config: TransformerConfig,
    *,
    num_embeddings: int,
    seed: int,
    device: torch.device,
    backend: KernelBackend,
    shard_group: Optional[dist.ProcessGroup] = None,
) -> EmbeddingTable:
    """The plain table of ``num_embeddings`` rows (unless the config sets more), drawn under
    the key ``("table", name)``; or a dynamic one keyed by raw ids, sharded over
    ``shard_group`` (tensor-parallel ranks keep identical copies), its rows seeded by
    ``seed`` unless its config sets a seed."""
    if table.type == "dynamic":
        collection = DynamicEmbeddingCollection(
            {name: table}, default_seed=seed, device=device, group=shard_group, backend=backend
        )
        return DynamicEmbedding(model_config, collection, name)
    with keyed_init(seed, "table", name):
        return PlainEmbedding(model_config, table, table.num_embeddings or num_embeddings)
