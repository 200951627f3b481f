"""The slots of a bucketed hash table: which (id, tag) sits where, and its scores.

``num_buckets x bucket_size`` slots; a key lives in bucket ``bucket_ids(routing key)``. Per
slot: ``keys`` (int64 raw id), ``tags`` (int32 logical table), ``last_seen`` (step of the last
training lookup, -1 = empty), ``freq`` (occurrences seen) and ``changed`` (1 when the slot's
content changed since the last dump). Row data (vectors, optimizer state) lives beside it in
:class:`megatron_gr.embeddings.dynamic.table.PhysicalTable`, indexed by slot.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_gr.ops import hash_table
from megatron_gr.ops.pytorch.hash_probe import ProbeResult


class HashIndex:
    def __init__(self, num_buckets: int, bucket_size: int, *, policy: str, kernel: str, device: torch.device):
        self.num_buckets = num_buckets
        self.bucket_size = bucket_size
        self.policy = policy
        self.kernel = kernel
        capacity = num_buckets * bucket_size
        self.keys = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.tags = torch.zeros(capacity, dtype=torch.int32, device=device)
        self.last_seen = torch.full((capacity,), -1, dtype=torch.int64, device=device)
        self.freq = torch.zeros(capacity, dtype=torch.int64, device=device)
        # One spare flag past the end absorbs marks of rows without a slot (see mark_changed).
        self._changed = torch.zeros(capacity + 1, dtype=torch.uint8, device=device)
        self.changed = self._changed[:capacity]

    @property
    def capacity(self) -> int:
        return self.keys.numel()

    def probe(
        self,
        ids: torch.Tensor,
        tags: torch.Tensor,
        hashes: torch.Tensor,
        counts: torch.Tensor,
        may_insert: torch.Tensor,
        *,
        step: int,
        update_scores: bool,
        valid: Optional[torch.Tensor] = None,
    ) -> ProbeResult:
        """Find-or-insert distinct (id, tag) queries sorted by routing key (``ops.hash_table.probe``;
        ``valid``: the number of queries on the device, the rest padding)."""
        return hash_table.probe(
            self.keys, self.tags, self.last_seen, self.freq, self.changed,
            ids, tags, hashes, counts, may_insert,
            num_buckets=self.num_buckets, bucket_size=self.bucket_size, step=step,
            policy=self.policy, update_scores=update_scores, valid=valid, kernel=self.kernel,
        )

    def occupied(self) -> torch.Tensor:
        return self.last_seen >= 0

    def occupancy(self) -> torch.Tensor:
        """Stored rows (a device scalar: reading it is the caller's choice of sync)."""
        return self.occupied().sum()

    def mark_changed(self, slots: torch.Tensor) -> None:
        """Flags ``slots`` for the next incremental dump; entries < 0 are ignored (they
        land on the spare flag: no host round trip to filter them out)."""
        # index_fill_, not ``[...] = 1``: a Python value assigned on a GPU is copied there
        # first, and that copy waits for the device.
        self._changed.index_fill_(0, torch.where(slots >= 0, slots, self.capacity), 1)

    def release(self, slots: torch.Tensor) -> None:
        """Empties ``slots`` (their ids are forgotten)."""
        self.last_seen.index_fill_(0, slots, -1)
        self.freq.index_fill_(0, slots, 0)
        self.changed.index_fill_(0, slots, 1)

    def expired(self, current_step: int, ttl_steps: int, *, unless: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Slots whose id was not looked up in the last ``ttl_steps`` completed steps; none
        where the 0-dim device flag ``unless`` is nonzero (a step the device skipped)."""
        expired = self.occupied() & (self.last_seen < current_step - ttl_steps)
        if unless is not None:
            expired = expired & (unless == 0)
        return torch.nonzero(expired).squeeze(1)

    def stored_slots(self) -> torch.Tensor:
        """Occupied slots, in slot order."""
        return torch.nonzero(self.occupied()).squeeze(1)
