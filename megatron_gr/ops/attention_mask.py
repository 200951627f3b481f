"""Which key j a query i may attend to inside one sequence: the single definition of the
STU attention masks, shared by the reference and every kernel's tests.

For a sequence of length L with t target tokens at its end (history H = L - t) and c
contextual tokens at its start, query i may attend to key j (both < L) when the first
rule that applies says so:

1. ``j < c``: contextual tokens are seen by every token (and see each other);
2. otherwise, if j is a target (``j >= H``): only ``j == i`` (targets see themselves, no
   other target);
3. otherwise, with ``p(x) = min(x, H)`` (all targets sit at position H, so each target sees
   the same history as a query placed right after it):

   - causal: ``p(j) <= p(i)``;
   - and, with a local window ``w = max_attn_len > 0``: ``p(i) - p(j) <= w`` (``|p(i) - p(j)|``
     when not causal) **or** ``j < g`` where ``g = global_prefix_len``.

Semi-local attention (SLA, config ``sla_k1`` / ``sla_k2``) is rule 3 with the window
``w = sla_k1`` and the global prefix ``g = sla_k2``: a token sees its ``k1`` most recent
predecessors and the first ``k2`` tokens of its sequence, causally (a prefix token is seen
only by the queries at or after it). The prefix counts from the start of the sequence,
contextual tokens included; contextual tokens (rule 1) and targets (rule 2) keep their
rules, so a target sees the last ``k1`` history tokens, the prefix, the contextual tokens and
itself. Without a window (``w = 0``) every history key already passes rule 3 and the prefix
changes nothing.
"""

from __future__ import annotations

from typing import Optional

import torch


def attention_mask(
    lengths: torch.Tensor,
    max_len: int,
    *,
    causal: bool = True,
    max_attn_len: int = 0,
    contextual_len: int = 0,
    num_targets: Optional[torch.Tensor] = None,
    global_prefix_len: int = 0,
) -> torch.Tensor:
    """Boolean ``[B, max_len, max_len]``: True where query i may attend to key j."""
    idx = torch.arange(max_len, device=lengths.device)
    return allowed_pairs(
        idx.view(1, -1, 1), idx.view(1, 1, -1), lengths.view(-1, 1, 1), causal=causal, max_attn_len=max_attn_len,
        contextual_len=contextual_len, num_targets=num_targets.view(-1, 1, 1) if num_targets is not None else None,
        global_prefix_len=global_prefix_len,
    )


def allowed_pairs(
    row: torch.Tensor,
    col: torch.Tensor,
    length: torch.Tensor,
    *,
    causal: bool = True,
    max_attn_len: int = 0,
    contextual_len: int = 0,
    num_targets: Optional[torch.Tensor] = None,
    global_prefix_len: int = 0,
) -> torch.Tensor:
    """The rules for queries at positions ``row`` and keys at positions ``col`` of sequences
    of ``length`` tokens with ``num_targets`` targets (int tensors that broadcast together):
    True where the query may attend to the key. Positions count from the start of the
    sequence, also when a rank holds only part of it (context parallelism)."""
    history = length - (num_targets if num_targets is not None else 0)
    in_range = (row < length) & (col < length)

    pos_row = torch.minimum(row, history)
    pos_col = torch.minimum(col, history)
    distance = pos_row - pos_col
    allowed = distance >= 0 if causal else torch.ones_like(distance, dtype=torch.bool)
    if max_attn_len > 0:
        local = distance.abs() <= max_attn_len
        if global_prefix_len > 0:
            local = local | (col < global_prefix_len)
        allowed = allowed & local
    col_is_target = col >= history
    allowed = torch.where(col_is_target, row == col, allowed)
    if contextual_len > 0:
        allowed = allowed | (col < contextual_len)
    return allowed & in_range
