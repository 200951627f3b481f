"""The item-id space of a data set, owned by the data and handed to loaders and models.

Data sets number their items densely (1..num_items, 0 = padding) and keep each item's raw
id (``UserSequences.item_vocab``). Which of the two the item table is keyed by is decided
once, here: a plain table by dense ids, a dynamic (hash) table by raw ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ItemSpace:
    vocab: np.ndarray
    """``[num_items + 1]`` int64: the raw id of each dense id; ``vocab[0]`` is padding."""
    raw_keys: bool
    """The item table is keyed by raw ids (a hash table) instead of dense ids."""

    def __post_init__(self):
        if self.vocab.ndim != 1 or self.vocab.shape[0] < 2:
            raise ValueError(f"vocab must list the padding id and at least one item, got shape {self.vocab.shape}")

    @property
    def num_items(self) -> int:
        return self.vocab.shape[0] - 1

    def table_ids(self, dense: np.ndarray) -> torch.Tensor:
        """The ids the item table is keyed by for dense item ids (any shape), int64."""
        ids = self.vocab[dense] if self.raw_keys else dense
        return torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))

    def corpus(self) -> torch.Tensor:
        """``[num_items]`` every item of the corpus, in table ids (dense order)."""
        return self.table_ids(np.arange(1, self.num_items + 1))
