"""Sequence parallelism for jagged batches: the packed tokens ``[T, 1, C]`` are split into
``tp`` equal slices ``[T / tp, 1, C]`` between the attention blocks.

T rarely divides by ``tp``, so the batch is padded with ``p < tp`` tokens that form a
sequence of their own at the end (offsets get one more entry)::

    offsets [0, 3, 4, 7]  tp = 2  ->  offsets [0, 3, 4, 7, 8]   one padding token

Attention never crosses sequence boundaries, so no real token sees the padding and the
padding sees only itself; the model drops the padding before the loss and the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel

from megatron_gr.transformer.jagged_seq_params import JaggedSeqParams


@dataclass(frozen=True)
class TokenSplit:
    """How a batch's tokens are laid out between the attention blocks."""

    num_tokens: int  # real tokens T
    padding: int  # tokens appended so that T + padding divides by the group size
    group: Optional[torch.distributed.ProcessGroup]  # None: tokens are not split

    @classmethod
    def for_tokens(cls, num_tokens: int, group: Optional[torch.distributed.ProcessGroup]) -> "TokenSplit":
        if group is None or group.size() == 1:
            return cls(num_tokens, 0, None)
        return cls(num_tokens, -num_tokens % group.size(), group)

    def seq_params(
        self,
        offsets: torch.Tensor,
        max_len: int,
        timestamps: Optional[torch.Tensor] = None,
        num_targets: Optional[torch.Tensor] = None,
    ) -> JaggedSeqParams:
        """Jagged metadata of the padded batch: the padding is one more sequence, with no
        targets (``num_targets`` ``[B]`` -> ``[B + 1]``)."""
        if self.padding:
            offsets = torch.cat([offsets, offsets[-1:] + self.padding])
            max_len = max(max_len, self.padding)
            if timestamps is not None:
                timestamps = F.pad(timestamps, (0, self.padding))
            if num_targets is not None:
                num_targets = F.pad(num_targets, (0, 1))
        return JaggedSeqParams.from_offsets(offsets, max_len, timestamps=timestamps, num_targets=num_targets)

    def scatter(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[T, 1, C]`` (the same on every rank) -> this rank's ``[(T + p) / tp, 1, C]``."""
        if self.group is None:
            return hidden
        hidden = F.pad(hidden, (0, 0, 0, 0, 0, self.padding))
        return tensor_parallel.scatter_to_sequence_parallel_region(hidden, group=self.group)

    def gather(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's ``[(T + p) / tp, 1, C]`` -> ``[T, 1, C]`` on every rank.

        Every rank then computes the same loss from the same tokens, so the backward pass
        keeps only this rank's slice of the gradient (no reduction).
        """
        if self.group is None:
            return hidden
        hidden = tensor_parallel.gather_from_sequence_parallel_region(
            hidden, tensor_parallel_output_grad=False, group=self.group
        )
        return hidden[: self.num_tokens]
