"""The dynamic table behind the model's :class:`EmbeddingTable` interface."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from megatron.core.transformer import TransformerConfig

from megatron_gr.embeddings.base import EmbeddingTable
from megatron_gr.embeddings.dynamic.collection import DynamicEmbeddingCollection, check_ids

# Ids per exchange while filling an evaluation cache (bounds the all-to-all buffers).
CACHE_CHUNK = 1 << 18


class DynamicEmbedding(EmbeddingTable):
    """One feature of a :class:`DynamicEmbeddingCollection` as an item table: raw int64 ids
    of any shape -> ``[*ids.shape, dim]`` in the model's parameter dtype.

    Training lookups (train mode with gradients) insert unseen ids and collect row
    gradients for the sparse optimizer; other lookups read only. Inside
    :meth:`evaluation_cache` reads of the cached ids are local: no exchange, so ranks may
    run different numbers of evaluation batches.
    """

    def __init__(self, config: TransformerConfig, collection: DynamicEmbeddingCollection, feature: str):
        super().__init__(config)
        self.collection = collection
        self.feature = feature
        self.dim = collection.dim(feature)
        self._cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # sorted ids, their rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup_many([ids])[0]

    def lookup_many(self, ids: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One lookup for all of ``ids``: one dedupe and, across ranks, one exchange with its
        host reads, where a lookup each would cost one each (and a training step one more
        dedupe to sum the row gradients of several lookups)."""
        for part in ids:
            check_ids(self.feature, part)
        flat = ids[0].reshape(-1) if len(ids) == 1 else torch.cat([part.reshape(-1) for part in ids])
        if self._cache is not None and not (self.training and torch.is_grad_enabled()):
            rows = self._cached_rows(flat)
        else:
            rows = self.collection.lookup(self.feature, flat)
        rows = rows.to(self.config.params_dtype)
        return [part.reshape(*i.shape, self.dim) for part, i in zip(rows.split([i.numel() for i in ids]), ids)]

    @contextlib.contextmanager
    def evaluation_cache(self, ids: torch.Tensor) -> Iterator[None]:
        """Reads ``ids`` (the same on every rank) once, collectively, and serves later reads
        of them locally until the context ends."""
        check_ids(self.feature, ids)
        with torch.no_grad():
            rows = torch.cat([self.collection.lookup(self.feature, chunk) for chunk in ids.reshape(-1).split(CACHE_CHUNK)])
        sorted_ids, order = torch.sort(ids.reshape(-1))
        self._cache = (sorted_ids, rows[order])
        try:
            yield
        finally:
            self._cache = None

    def _cached_rows(self, ids: torch.Tensor) -> torch.Tensor:
        sorted_ids, rows = self._cache
        position = torch.searchsorted(sorted_ids, ids).clamp(max=max(sorted_ids.numel() - 1, 0))
        found = sorted_ids[position] == ids
        if not bool(found.all()):
            missing = ids[~found][:5].tolist()
            raise KeyError(f"ids {missing} are not in the evaluation cache of dynamic table '{self.feature}'")
        return rows[position]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None) -> dict:
        """Nothing for megatron's dist checkpoint: a table's shards differ in size per rank
        and reshard by id, so training checkpoints store them in their own files."""
        return {}
