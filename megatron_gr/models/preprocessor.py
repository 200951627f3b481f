"""Token inputs of the STU block: item embedding plus position and time encodings."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_gr.config.transformer_config import GRTransformerConfig
from megatron_gr.ops.jagged import sequence_ids_and_positions
from megatron_gr.ops.keyed_dropout import DropoutKeys, keyed_dropout
from megatron_gr.ops.time_buckets import bucketize_time_gaps
from megatron_gr.transformer.dropout_sites import EMBEDDING, site_keys


class InputPreprocessor(MegatronModule):
    """``x_t = sqrt(C) * e(item_t) + p(position_t) + g(bucket(ts_t - ts_{t-1}))``, then dropout.

    Positions count from the first event kept in the window; the time gap of a sequence's
    first event is 0. Both encodings only look backwards, so they leak nothing about the
    next item. The dropout is keyed (site ``EMBEDDING`` of ``dropout_sites``).
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
        dropout_keys: Optional[DropoutKeys] = None,
    ) -> torch.Tensor:
        """``item_embeddings`` ``[T, C]`` -> STU input ``[T, 1, C]``. ``dropout_keys``: the
        batch's (site ``EMBEDDING``); without them tokens are keyed by row (``site_keys``)."""
        num_tokens = item_embeddings.shape[0]
        _, positions = sequence_ids_and_positions(offsets, num_tokens)
        previous = torch.cat([timestamps[:1], timestamps[:-1]])
        gaps = torch.where(positions > 0, timestamps - previous, torch.zeros_like(timestamps))
        buckets = bucketize_time_gaps(gaps, self.config.num_time_buckets, self.config.time_bucket_fn)
        x = item_embeddings * self.scale + self.position_embedding(positions) + self.time_embedding(buckets)
        p = self.config.embedding_dropout
        if self.training and p > 0 and dropout_keys is None:
            dropout_keys = site_keys(None, EMBEDDING, num_tokens=num_tokens, device=x.device, local=False)
        x = keyed_dropout(x, dropout_keys, p=p, training=self.training, kernel=self.config.attention_kernel)
        return x.unsqueeze(1)
