"""The jagged ranking batch: per user one sequence [contextual | history | candidates].

For two users, 2 contextual features, histories of 3 and 1 events, 2 and 1 candidates::

    tokens            = [c c h h h k k | c c h k]     # T = 11 tokens, one packed sequence each
    offsets           = [0, 7, 11]                    # [B + 1]
    num_targets       = [2, 1]                        # candidates at the end of each sequence
    contextual_index  = [0, 1, 7, 8]                  # [B * C] token of each contextual feature
    history_index     = [2, 3, 4, 9]                  # [H] token of each history event
    candidate_index   = [5, 6, 10]                    # [N] token of each candidate

Ids are what each feature's table is keyed by (dense, or raw for dynamic tables). Time
gaps are seconds from the event (or candidate) to the user's query time, positions count
history events back from it (the latest event is 1). ``labels`` has one column per task.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import torch


@dataclass
class RankingBatch:
    offsets: torch.Tensor
    """``[B + 1]`` int64 token offsets of the sequences."""
    num_targets: torch.Tensor
    """``[B]`` int64 candidates at the end of each sequence."""
    token_timestamps: torch.Tensor
    """``[T]`` int64: contextual tokens carry the query time, events and candidates their own."""
    contextual_ids: torch.Tensor
    """``[B, contextual features]`` int64."""
    contextual_index: torch.Tensor
    """``[B * C]`` int64 token positions, user-major."""
    history_ids: torch.Tensor
    """``[H, uih features]`` int64."""
    history_actions: torch.Tensor
    """``[H]`` int64 action bitmasks."""
    history_watchtimes: torch.Tensor
    """``[H]`` float32."""
    history_positions: torch.Tensor
    """``[H]`` int64: events from the query time, the latest is 1."""
    history_gaps: torch.Tensor
    """``[H]`` int64 seconds from the event to the query time."""
    history_index: torch.Tensor
    """``[H]`` int64 token positions."""
    candidate_ids: torch.Tensor
    """``[N, candidate features]`` int64."""
    candidate_timestamps: torch.Tensor
    """``[N]`` int64."""
    candidate_gaps: torch.Tensor
    """``[N]`` int64 seconds from the candidate to the query time."""
    candidate_index: torch.Tensor
    """``[N]`` int64 token positions."""
    labels: torch.Tensor
    """``[N, tasks]`` float32."""
    user_ids: torch.Tensor
    """``[N]`` int64 raw user id of each candidate (per-user GAUC)."""
    oracle: Optional[torch.Tensor] = None
    """``[N, tasks]`` float64 planted probabilities (NaN: unknown); None when none is known."""
    max_len: int = 0
    """Longest sequence, computed on the host."""
    token_keys: Optional[torch.Tensor] = None
    """``[T]`` int64 dropout keys of the tokens (training batches): the sample's index in the
    step's global batch x ``max_seq_len`` + the token's position, so every layout drops the
    same elements (``megatron_gr/ops/keyed_dropout.py``); None in evaluation."""
    dropout_seed: int = 0
    """The step's dropout seed (training batches)."""
    host_offsets: Optional[torch.Tensor] = field(default=None, repr=False)
    """The offsets on the CPU once the batch moved to a device (context parallelism plans
    its split on the host)."""

    @property
    def batch_size(self) -> int:
        return self.offsets.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.token_timestamps.numel()

    @property
    def num_candidates(self) -> int:
        return self.candidate_index.numel()

    def to(self, device) -> "RankingBatch":
        moved = {"host_offsets": self.offsets_on_host()}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "host_offsets":
                moved[f.name] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        return RankingBatch(**moved)

    def offsets_on_host(self) -> torch.Tensor:
        """The offsets as a CPU tensor (a device copy only when the batch was built on a device)."""
        if self.host_offsets is not None:
            return self.host_offsets
        return self.offsets if self.offsets.device.type == "cpu" else self.offsets.cpu()
