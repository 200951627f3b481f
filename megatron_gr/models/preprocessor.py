"""Token inputs of the layer block: item embedding plus position and time encodings."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_gr.config.transformer_config import GRTransformerConfig
from megatron_gr.ops.backend import KernelBackend, check_backend
from megatron_gr.ops.jagged import sequence_ids_and_positions
from megatron_gr.ops.keyed_dropout import DropoutKeys, keyed_dropout
from megatron_gr.ops.time_buckets import bucketize_time_gaps
from megatron_gr.transformer.dropout_sites import EMBEDDING, site_keys


class InputPreprocessor(MegatronModule):
    """``x_t = s * e(item_t) + p(position_t) + g(bucket(gap_t))``, then dropout.

    ``s`` is sqrt(C) (``scale_item_embeddings``) or 1. ``position_t`` counts from the first
    event kept in the window (``position_encoding='from_start'``) or back from the last
    (``from_end``). ``gap_t`` (``time_feature``) is ts_t - ts_{t-1} (0 for a sequence's
    first event) or the token's query time minus ts_t, the query time being the time of the
    event the token predicts. Either encoding may be off (``none``). None of them reveals
    the item a token predicts: the query time of the last evaluation token is the target's
    timestamp, which the paper's setting knows when the recommendation is requested. The
    dropout is keyed (site ``EMBEDDING`` of ``dropout_sites``) and runs on ``backend``.
    """

    def __init__(self, config: GRTransformerConfig, *, backend: KernelBackend = KernelBackend.PYTORCH):
        super().__init__(config)
        self.backend = check_backend(backend)
        width = config.hidden_size
        # Both tables are always drawn, in this order, so that every setting consumes the
        # same random numbers (later parameters start from the same values); a table whose
        # encoding is off is then dropped: a parameter without gradients would stall
        # megatron's overlapped gradient reduction.
        position = torch.nn.Embedding(config.max_seq_len, width, dtype=config.params_dtype)
        time = torch.nn.Embedding(config.num_time_buckets, width, dtype=config.params_dtype)
        with torch.no_grad():
            torch.nn.init.normal_(position.weight, std=config.init_method_std)
            torch.nn.init.normal_(time.weight, std=config.init_method_std)
        self.position_embedding = position if config.position_encoding != "none" else None
        self.time_embedding = time if config.time_feature != "none" else None
        self.scale = width**0.5 if config.scale_item_embeddings else 1.0

    def forward(
        self,
        item_embeddings: torch.Tensor,
        offsets: torch.Tensor,
        timestamps: torch.Tensor,
        query_timestamps: Optional[torch.Tensor] = None,
        dropout_keys: Optional[DropoutKeys] = None,
        *,
        tokens: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``item_embeddings`` ``[T, C]`` -> block input ``[T, 1, C]``; ``query_timestamps``
        ``[T]`` is needed by ``time_feature='until_query'``. ``dropout_keys``: the batch's
        (site ``EMBEDDING``); without them tokens are keyed by row (``site_keys``).
        ``tokens``: which tokens of the batch (``offsets``, ``timestamps``) the embeddings
        are, when they are only some of them (context parallelism: a rank's share);
        positions and gaps stay those in the whole sequence."""
        config = self.config
        num_tokens = timestamps.shape[0]
        seq_ids, positions = sequence_ids_and_positions(offsets, num_tokens)
        gaps = self._time_gaps(timestamps, query_timestamps, positions)
        if config.position_encoding == "from_end":
            positions = offsets[1:][seq_ids] - offsets[:-1][seq_ids] - 1 - positions
        if tokens is not None:
            positions = positions[tokens]
            gaps = None if gaps is None else gaps[tokens]
        x = item_embeddings * self.scale
        if config.position_encoding != "none":
            x = x + self.position_embedding(positions)
        if gaps is not None:
            x = x + self.time_embedding(bucketize_time_gaps(gaps, config.num_time_buckets, config.time_bucket_fn))
        p = config.embedding_dropout
        if self.training and p > 0 and dropout_keys is None:
            dropout_keys = site_keys(None, EMBEDDING, num_tokens=x.shape[0], device=x.device, local=False)
        x = keyed_dropout(x, dropout_keys, p=p, training=self.training, kernel=self.backend)
        return x.unsqueeze(1)

    def _time_gaps(
        self, timestamps: torch.Tensor, query_timestamps: Optional[torch.Tensor], positions: torch.Tensor
    ) -> Optional[torch.Tensor]:
        """Seconds bucketed by the time encoding of each token, or None without one."""
        feature = self.config.time_feature
        if feature == "since_previous":
            previous = torch.cat([timestamps[:1], timestamps[:-1]])
            return torch.where(positions > 0, timestamps - previous, torch.zeros_like(timestamps))
        if feature == "until_query":
            if query_timestamps is None:
                raise ValueError("time_feature='until_query' needs the batch's query_timestamps")
            return query_timestamps - timestamps
        return None
