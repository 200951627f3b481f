"""Learned relative attention bias of STU layers: one weight per position-distance bucket
plus one per time-gap bucket (from the key's time to the query token's own time, or to the
time of the event it predicts with ``time_bias_origin='query'``), shared by all heads. The
layer hands the weights and the batch's timestamps to the attention op
(:class:`RelativeBiasInputs`), which applies the bias pair by pair: the reference
materialises it, the Triton kernel computes it on chip."""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule

from megatron_gr.config.transformer_config import GRTransformerConfig
from megatron_gr.ops.relative_bias import RelativeBiasInputs
from megatron_gr.transformer.jagged_seq_params import JaggedSeqParams


class RelativeBucketedBias(MegatronModule):
    def __init__(self, config: GRTransformerConfig, tp_group=None):
        super().__init__(config)
        self.tp_group = tp_group
        self.position_weights = torch.nn.Parameter(torch.empty(config.num_position_buckets, dtype=config.params_dtype))
        self.time_weights = torch.nn.Parameter(torch.empty(config.num_time_buckets, dtype=config.params_dtype))
        with torch.no_grad():
            torch.nn.init.normal_(self.position_weights, std=config.init_method_std)
            torch.nn.init.normal_(self.time_weights, std=config.init_method_std)

    def forward(self, params: JaggedSeqParams) -> RelativeBiasInputs:
        """The bias inputs of the batch; the reference keeps its bucket ids in
        ``params.cache`` so every layer reuses them."""
        # Each tensor-parallel rank applies the bias to its own heads: the gradient of these
        # replicated weights is the sum over ranks (identity forward, all-reduce backward).
        position, time = (
            tensor_parallel.copy_to_tensor_model_parallel_region(w, group=self.tp_group)
            for w in (self.position_weights, self.time_weights)
        )
        query_timestamps = None
        if self.config.time_bias_origin == "query":
            if params.query_timestamps is None:
                raise ValueError("time_bias_origin='query' needs the batch's query_timestamps in the JaggedSeqParams")
            query_timestamps = params.query_timestamps
        return RelativeBiasInputs(
            position_weights=position,
            time_weights=time,
            timestamps=params.timestamps,
            time_bucket_fn=self.config.time_bucket_fn,
            query_timestamps=query_timestamps,
            cache=params.cache,
        )
