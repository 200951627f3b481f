"""Reference of the rows behind a hash-table lookup (vectorised PyTorch, any device): fresh
slots get their initial value, and queries read their stored row or their initial value."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_gr.ops.pytorch.hash_probe import INSERTED, REPLACED
from megatron_gr.ops.pytorch.id_hash import initial_values


def _initial(ids: torch.Tensor, tags: torch.Tensor, salts: torch.Tensor, scales: torch.Tensor, dim: int) -> torch.Tensor:
    tag = tags.to(torch.int64)
    return initial_values(ids, salts[tag], scales[tag], dim)


def pytorch_init_rows(
    weights: torch.Tensor,
    fresh: Optional[torch.Tensor],
    slots: torch.Tensor,
    status: torch.Tensor,
    ids: torch.Tensor,
    tags: torch.Tensor,
    salts: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    """Every query the probe just placed (INSERTED or REPLACED) gets its initial value in its
    slot of ``weights`` ``[C, D]`` and, when ``fresh`` ``[C]`` uint8 is given, its flag set
    there: its optimizer state counts as initial until its first update (see
    :func:`megatron_gr.ops.sparse_optimizers.sparse_update`). ``salts`` ``[num_tags]`` int64
    and ``scales`` ``[num_tags]`` float32 are the initial-value constants of each logical
    table."""
    placed = (status == INSERTED) | (status == REPLACED)
    new_slots = slots[placed]
    weights[new_slots] = _initial(ids[placed], tags[placed], salts, scales, weights.shape[1])
    if fresh is not None:
        fresh.index_fill_(0, new_slots, 1)


def pytorch_read_rows(
    weights: torch.Tensor,
    slots: torch.Tensor,
    ids: torch.Tensor,
    tags: torch.Tensor,
    salts: torch.Tensor,
    scales: torch.Tensor,
    index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Rows ``[U, D]`` float32 of ``U`` probed queries: the stored row where ``slots >= 0``
    (after :func:`pytorch_init_rows`: fresh slots hold their initial value), the initial
    value elsewhere. With ``index`` ``[N]``, the rows of queries ``index``: ``[N, D]``."""
    rows = torch.empty(ids.numel(), weights.shape[1], dtype=torch.float32, device=weights.device)
    stored = slots >= 0
    rows[stored] = weights[slots[stored]]
    missing = ~stored
    rows[missing] = _initial(ids[missing], tags[missing], salts, scales, weights.shape[1])
    return rows if index is None else rows.index_select(0, index)
