"""The interface every item table implements, so a sharded dynamic table can replace the
plain one without touching the model."""

from __future__ import annotations

import abc
import contextlib
from typing import ContextManager, Sequence

import torch
from megatron.core.transformer.module import MegatronModule


class EmbeddingTable(MegatronModule, abc.ABC):
    """Maps integer ids (any shape) to vectors ``[*ids.shape, dim]``.

    Implementations differ in what ids they accept (dense remapped ids for the plain table,
    raw int64 ids for hash tables) and where rows live; gradients flow back to the rows
    looked up.
    """

    dim: int

    @abc.abstractmethod
    def forward(self, ids: torch.Tensor) -> torch.Tensor: ...

    def lookup_many(self, ids: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The rows of each of several id tensors, as ``[self(i) for i in ids]``. A table
        whose lookup costs a round trip (a hash table's distinct count, an exchange
        between ranks) answers them all with one."""
        return [self(i) for i in ids]

    def evaluation_cache(self, ids: torch.Tensor) -> ContextManager[None]:
        """Within the context, reads of ``ids`` need no communication between ranks (a
        sharded table fetches them once on entry). Tables whose lookups are local need
        nothing."""
        return contextlib.nullcontext()
