"""Reference of the rows a hash-table lookup returns (vectorised PyTorch, any device)."""

from __future__ import annotations

import torch

from megatron_gr.ops.pytorch.hash_probe import HIT, INSERTED, REPLACED
from megatron_gr.ops.pytorch.id_hash import initial_values


def pytorch_materialize_rows(
    weights: torch.Tensor,
    states: list[torch.Tensor],
    state_init: list[float],
    slots: torch.Tensor,
    status: torch.Tensor,
    ids: torch.Tensor,
    tags: torch.Tensor,
    salts: torch.Tensor,
    scales: torch.Tensor,
) -> torch.Tensor:
    """Rows ``[U, D]`` float32 for probed queries, and fresh slots initialised in place.

    A hit reads its stored row. A query inserted by the probe (INSERTED or REPLACED) gets its
    initial value, written to its slot together with fresh optimizer state (``states[i]``,
    ``[C, D]`` or ``[C]``, set to ``state_init[i]``). Any other query reads its initial value
    and stores nothing. ``salts`` ``[num_tags]`` int64 and ``scales`` ``[num_tags]`` float32
    are the initial-value constants of each logical table.
    """
    dim = weights.shape[1]
    rows = torch.empty(ids.numel(), dim, dtype=torch.float32, device=weights.device)
    hit = status == HIT
    rows[hit] = weights[slots[hit]]
    miss = ~hit
    tag = tags[miss].to(torch.int64)
    rows[miss] = initial_values(ids[miss], salts[tag], scales[tag], dim)
    new = (status == INSERTED) | (status == REPLACED)
    new_slots = slots[new]
    weights[new_slots] = rows[new]
    for state, value in zip(states, state_init):
        state.index_fill_(0, new_slots, value)
    return rows
