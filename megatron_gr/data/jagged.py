"""The jagged batch: variable-length sequences packed without padding.

Layout, for three users with 3, 1 and 2 events::

    item_ids    = [a0 a1 a2 | b0 | c0 c1]      # [T] int64, T = 6 tokens
    timestamps  = [.. .. .. | .. | .. ..]      # [T] int64, seconds
    ratings     = [.. .. .. | .. | .. ..]      # [T] float32 (the "action" of each event)
    offsets     = [0, 3, 4, 6]                 # [B + 1] int64, offsets[0] = 0, non-decreasing
    user_ids    = [ua, ub, uc]                 # [B] int64

Training batches carry ``labels[t]``, the item that follows token t in its sequence, the
step's sampled-softmax negatives and each token's dropout key (see the fields). Evaluation
batches carry one held-out ``target_ids[b]`` per sequence, ranked against the
whole item corpus from the representation of the sequence's last token.

``query_timestamps[t]`` is the time of the event that token t predicts, its query time: the
label's timestamp in training; in evaluation the next input event's, and for a sequence's
last token the held-out target's (known when the recommendation is requested, as in the
HSTU paper; the target's item is never revealed).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import torch


@dataclass
class JaggedBatch:
    item_ids: torch.Tensor
    timestamps: torch.Tensor
    ratings: torch.Tensor
    offsets: torch.Tensor
    user_ids: torch.Tensor
    # Time of the event each token predicts (see the module docstring), [T] int64.
    query_timestamps: Optional[torch.Tensor] = None
    # Training only: the next item after each token, [T].
    labels: Optional[torch.Tensor] = None
    # Evaluation only: the held-out next item of each sequence, [B].
    target_ids: Optional[torch.Tensor] = None
    # Tokens at the end of each sequence that are candidates/targets (ranking), [B].
    num_targets: Optional[torch.Tensor] = None
    # Training only: the sampled softmax's negatives [R], in the item table's ids. Drawn once
    # per optimizer step for the whole global batch, so every micro-batch of the step (on
    # every rank) carries the same ones.
    negative_ids: Optional[torch.Tensor] = None
    # Training only: each token's dropout key [T] int64, its sample's index within the step's
    # global batch x max_seq_len + its position in the sequence (ops/keyed_dropout.py).
    token_keys: Optional[torch.Tensor] = None
    # Longest sequence, computed on the host when the batch is built (no device sync later).
    max_len: int = 0
    # The step's dropout seed, from the run seed and the step (the same on every rank).
    dropout_seed: int = 0
    # The offsets on the host, kept by ``to``: context parallelism plans each rank's share
    # from the lengths without waiting for the device.
    host_offsets: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.offsets.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.item_ids.numel()

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def to(self, device) -> "JaggedBatch":
        """The batch on ``device`` (its offsets kept on the host too); the batch itself when
        everything is there already (the prefetcher's copies: no call per tensor)."""
        values = [(f.name, getattr(self, f.name)) for f in fields(self)]
        device = torch.device(device)
        if self.host_offsets is not None and all(
            value.device == device for name, value in values if isinstance(value, torch.Tensor) and name != "host_offsets"
        ):
            return self
        moved = {"host_offsets": self.offsets_on_host()}
        for name, value in values:
            if name != "host_offsets":
                moved[name] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        return JaggedBatch(**moved)

    def offsets_on_host(self) -> torch.Tensor:
        """The offsets as a CPU tensor (a device copy only when the batch was built on a device)."""
        if self.host_offsets is not None:
            return self.host_offsets
        return self.offsets if self.offsets.device.type == "cpu" else self.offsets.cpu()

    def validate(self) -> None:
        """Checks the invariants; raises ValueError naming the broken one.

        Off the hot path: loaders call it on the CPU before batches reach a kernel.
        """
        t = self.item_ids.numel()
        if self.offsets.dim() != 1 or self.offsets.numel() < 1:
            raise ValueError(f"offsets must be a 1-D tensor of B+1 entries, got {tuple(self.offsets.shape)}")
        if int(self.offsets[0]) != 0:
            raise ValueError(f"offsets[0] must be 0, got {int(self.offsets[0])}")
        if bool((self.offsets[1:] < self.offsets[:-1]).any()):
            raise ValueError("offsets must be non-decreasing (a negative sequence length was found)")
        if int(self.offsets[-1]) != t:
            raise ValueError(f"offsets[-1]={int(self.offsets[-1])} but there are {t} tokens")
        for name in ("timestamps", "ratings"):
            n = getattr(self, name).numel()
            if n != t:
                raise ValueError(f"{name} has {n} entries, item_ids has {t}")
        longest = int(self.lengths.max()) if self.batch_size > 0 else 0
        if self.max_len != longest:
            raise ValueError(f"max_len={self.max_len} but the longest sequence has {longest} tokens")
        if self.user_ids.numel() != self.batch_size:
            raise ValueError(f"user_ids has {self.user_ids.numel()} entries for {self.batch_size} sequences")
        if t and int(self.item_ids.min()) < 0:
            raise ValueError(f"item ids must be >= 0, found {int(self.item_ids.min())}")
        if self.query_timestamps is not None and self.query_timestamps.numel() != t:
            raise ValueError(f"query_timestamps has {self.query_timestamps.numel()} entries, item_ids has {t}")
        if self.labels is not None and self.labels.numel() != t:
            raise ValueError(f"labels has {self.labels.numel()} entries, item_ids has {t}")
        if self.token_keys is not None and (self.token_keys.numel() != t or self.token_keys.dtype != torch.int64):
            shape = tuple(self.token_keys.shape)
            raise ValueError(f"token_keys must be {t} int64 keys, got {self.token_keys.dtype} {shape}")
        if self.negative_ids is not None and self.negative_ids.numel() and int(self.negative_ids.min()) < 0:
            raise ValueError(f"negative ids must be >= 0, found {int(self.negative_ids.min())}")
        if self.target_ids is not None and self.target_ids.numel() != self.batch_size:
            raise ValueError(f"target_ids has {self.target_ids.numel()} entries for {self.batch_size} sequences")
