"""Causal softmax attention over packed (jagged) sequences: the core attention that megatron's
``SelfAttention`` calls in transformer layers fed with the batch's ``JaggedSeqParams``.

megatron-core's local ``DotProductAttention`` refuses packed sequences (only Transformer
Engine's attention takes them); this module is the readable PyTorch equivalent for the
retrieval model's jagged ``[T, 1, C]`` tokens:

    out_i = sum_{j <= i, same sequence} softmax_j(scale * q_i . k_j) v_j

with attention dropout on the weights (``config.attention_dropout``). Computed in float32
for half-precision inputs; pads the batch to its longest sequence.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_gr.ops.attention_mask import attention_mask
from megatron_gr.ops.jagged import jagged_to_padded, padded_to_jagged
from megatron_gr.transformer.jagged_seq_params import JaggedSeqParams


class JaggedSoftmaxAttention(MegatronModule):
    """Takes the arguments megatron gives its core attention (``DotProductAttention``'s)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"jagged softmax attention is causal, got attn_mask_type={attn_mask_type}")
        if config.context_parallel_size != 1:
            raise ValueError("jagged softmax attention does not split sequences over context-parallel ranks")
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask_: Optional[torch.Tensor] = None,
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[JaggedSeqParams] = None,
    ) -> torch.Tensor:
        """``query``, ``key``, ``value`` ``[T, local heads, d]`` -> ``[T, local heads * d]``."""
        if not isinstance(packed_seq_params, JaggedSeqParams):
            raise ValueError("jagged softmax attention needs the batch's JaggedSeqParams as packed_seq_params")
        if attention_mask_ is not None or attention_bias is not None:
            raise ValueError("jagged softmax attention builds its causal mask from the offsets: pass no mask or bias")
        offsets, n = packed_seq_params.offsets, packed_seq_params.max_len
        num_tokens = query.shape[0]
        compute = torch.promote_types(query.dtype, torch.float32)
        q, k, v = (jagged_to_padded(t.to(compute), offsets, n) for t in (query, key, value))  # [B, N, H, d]
        scores = torch.einsum("bihd,bjhd->bhij", q, k) * self.softmax_scale
        allowed = attention_mask(offsets[1:] - offsets[:-1], n, causal=True)
        # Padding rows see nothing; letting them see themselves keeps their softmax finite
        # (they are dropped below and get no gradient).
        allowed = allowed | torch.eye(n, dtype=torch.bool, device=allowed.device)
        weights = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
        if self.training and self.dropout_p > 0:
            # Each tensor-parallel rank drops its own heads' weights (the model-parallel RNG
            # stream), as megatron's attention does; under sequence parallelism the block
            # already runs the layer inside that stream.
            if self.config.sequence_parallel:
                weights = F.dropout(weights, p=self.dropout_p)
            else:
                with tensor_parallel.get_cuda_rng_tracker().fork():
                    weights = F.dropout(weights, p=self.dropout_p)
        out = torch.einsum("bhij,bjhd->bihd", weights, v)  # [B, N, H, d]
        out = padded_to_jagged(out, offsets, num_tokens).to(value.dtype)
        return out.reshape(num_tokens, -1)
