"""One entry per embedding table (``embeddings.<name>.<field>``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_gr.config.dynamic_embedding_config import DynamicTableConfig
from megatron_gr.config.validation import check_choice, check_float_range, check_int_range, require

EMBEDDING_TYPES = ("plain", "dynamic")


@dataclass
class EmbeddingTableConfig:
    dim: int = 64
    """Width of each embedding vector."""

    type: Literal["plain", "dynamic"] = "plain"
    """``plain``: a dense table over the dataset's remapped ids (vocab-parallel under
    tensor parallelism). ``dynamic``: a hash table keyed by raw int64 ids, rows created on
    first sight, sharded over data-parallel ranks (settings under ``dynamic``)."""

    num_embeddings: Optional[int] = None
    """Rows of a plain table; None sizes it from the data (number of distinct ids + padding)."""

    init_std: float = 0.02
    """Standard deviation of the initial values (normal for plain tables; uniform for
    dynamic ones, whose initial values must be reproducible bit for bit on every device)."""

    dynamic: Optional[DynamicTableConfig] = None
    """Settings of a ``dynamic`` table (defaults when unset)."""

    def __post_init__(self):
        check_int_range("dim", self.dim, low=1)
        check_choice("type", self.type, EMBEDDING_TYPES)
        if self.num_embeddings is not None:
            check_int_range("num_embeddings", self.num_embeddings, low=2)
        check_float_range("init_std", self.init_std, low=0.0, low_exclusive=True)
        if self.type == "dynamic":
            require(
                self.num_embeddings is None,
                f"num_embeddings={self.num_embeddings} applies to plain tables only: a dynamic "
                "table is sized by dynamic.capacity (rows per rank)",
            )
            if self.dynamic is None:
                self.dynamic = DynamicTableConfig()
        else:
            require(
                self.dynamic is None,
                "dynamic settings are given but type='plain': set type=dynamic to use them",
            )

    @property
    def keyed_by_raw_ids(self) -> bool:
        """Whether lookups take the dataset's raw item ids (hash tables) rather than the
        dense ids 1..num_items."""
        return self.type == "dynamic"
