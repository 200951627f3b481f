"""Token inputs of the STU block: item embedding plus position and time encodings."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megatron_gr.config.transformer_config import GRTransformerConfig
from megatron_gr.ops.jagged import sequence_ids_and_positions
from megatron_gr.ops.time_buckets import bucketize_time_gaps


class InputPreprocessor(MegatronModule):
    """``x_t = sqrt(C) * e(item_t) + p(position_t) + g(bucket(ts_t - ts_{t-1}))``, then dropout.

    Positions count from the first event kept in the window; the time gap of a sequence's
    first event is 0. Both encodings only look backwards, so they leak nothing about the
    next item.
    """

    def __init__(self, config: GRTransformerConfig):
        super().__init__(config)
        width = config.hidden_size
        self.position_embedding = torch.nn.Embedding(config.max_seq_len, width, dtype=config.params_dtype)
        self.time_embedding = torch.nn.Embedding(config.num_time_buckets, width, dtype=config.params_dtype)
        with torch.no_grad():
            torch.nn.init.normal_(self.position_embedding.weight, std=config.init_method_std)
            torch.nn.init.normal_(self.time_embedding.weight, std=config.init_method_std)
        self.scale = width**0.5

    def forward(
        self,
        item_embeddings: torch.Tensor,
        offsets: torch.Tensor,
        timestamps: torch.Tensor,
        *,
        tokens: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``item_embeddings`` ``[T, C]`` -> STU input ``[T, 1, C]``. ``tokens``: which tokens of
        the batch (``offsets``, ``timestamps``) the embeddings are, when they are only some of
        them (context parallelism: a rank's share); positions and gaps stay those in the
        whole sequence."""
        num_tokens = timestamps.shape[0]
        _, positions = sequence_ids_and_positions(offsets, num_tokens)
        previous = torch.cat([timestamps[:1], timestamps[:-1]])
        gaps = torch.where(positions > 0, timestamps - previous, torch.zeros_like(timestamps))
        if tokens is not None:
            positions, gaps = positions[tokens], gaps[tokens]
        buckets = bucketize_time_gaps(gaps, self.config.num_time_buckets, self.config.time_bucket_fn)
        x = item_embeddings * self.scale + self.position_embedding(positions) + self.time_embedding(buckets)
        x = F.dropout(x, p=self.config.embedding_dropout, training=self.training)
        return x.unsqueeze(1)
