"""``HyperConnectionTransformerBlock``: megatron's ``TransformerBlock`` for layers that
carry n residual streams.

    first pipeline stage:   hidden [s, b, C] --expand--> streams [s, b, n C]
    every stage:            streams -> layer -> ... -> layer -> streams
    last pipeline stage:    streams --contract (mean)--> [s, b, C] -> final norm (if any)

Stages in between receive and send ``[s, b, n C]``. With ``'mhc'`` in
``recompute_modules`` the layers run in recompute blocks of
``config.mhc_recompute_block_size(L)`` layers, each with its own
:class:`MHCRecomputeManager`.

megatron-core 0.16.1's block has no place for the expansion, the contraction before the
final norm or the recompute blocks, so ``forward`` is ours: it keeps megatron's
pipeline input (``set_input_tensor``), sequence-parallel RNG region and full-layer
recompute (through ``compat.checkpointed_block_forward``), and leaves out what
hyper-connections do not support yet (FP8/FP4 contexts, CPU offloading, CUDA graphs,
inference), which the config rejects.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core import utils as megatron_utils  # make_viewless_tensor: looked up at call time (compat.export)

from megatron_gr.compat import checkpointed_block_forward
from megatron_gr.transformer.hyper_connection import contract_streams, expand_streams
from megatron_gr.transformer.mhc_recompute import MHCRecomputeManager


class HyperConnectionTransformerBlock(TransformerBlock):
    def __init__(self, config, spec, post_layer_norm: bool = True, pre_process: bool = True,
                 post_process: bool = True, pg_collection=None, vp_stage: Optional[int] = None):
        super().__init__(config, spec, post_layer_norm, pre_process, post_process, pg_collection, vp_stage)
        self.num_streams = config.num_residual_streams

    def recompute_groups(self) -> list[list[torch.nn.Module]]:
        """The layers of this stage in recompute blocks (one block without mHC recompute)."""
        layers = list(self.layers)
        if not self.config.recompute_mhc:
            return [layers]
        size = self.config.mhc_recompute_block_size(len(layers))
        return [layers[i : i + size] for i in range(0, len(layers), size)]

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        context: Optional[torch.Tensor] = None,
        context_mask: Optional[torch.Tensor] = None,
        rotary_pos_emb: Optional[torch.Tensor] = None,
        rotary_pos_cos: Optional[torch.Tensor] = None,
        rotary_pos_sin: Optional[torch.Tensor] = None,
        rotary_pos_cos_sin: Optional[torch.Tensor] = None,
        attention_bias: Optional[torch.Tensor] = None,
        inference_context=None,
        packed_seq_params=None,
        sequence_len_offset: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
        **unused,
    ) -> torch.Tensor:
        """``hidden_states`` ``[s, b, C]`` on the first stage (later stages read the
        ``[s, b, n C]`` streams given to ``set_input_tensor``). Returns ``[s, b, C]`` on the
        last stage, the streams elsewhere."""
        if inference_context is not None:
            raise NotImplementedError("hyper-connection blocks do not support inference contexts yet")
        if self.pre_process:
            hidden_states = expand_streams(hidden_states, self.num_streams)
        else:
            hidden_states = self.input_tensor
        hidden_states = megatron_utils.make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)
        layer_kwargs = dict(
            attention_mask=attention_mask,
            context_mask=context_mask,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            rotary_pos_cos_sin=rotary_pos_cos_sin,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
            padding_mask=padding_mask,
        )
        # As megatron's block: with tokens split over tensor-parallel ranks, dropout draws
        # from the rank's own stream.
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if self.config.sequence_parallel else nullcontext()
        with rng:
            if self.config.recompute_granularity == "full" and self.training:
                hidden_states = checkpointed_block_forward(
                    self, hidden_states, attention_mask=attention_mask, context=context, context_mask=context_mask,
                    rotary_pos_emb=rotary_pos_emb, attention_bias=attention_bias, packed_seq_params=packed_seq_params,
                    padding_mask=padding_mask,
                )
            else:
                recompute = self.config.recompute_mhc and self.training and torch.is_grad_enabled()
                for group in self.recompute_groups():
                    manager = MHCRecomputeManager() if recompute else None
                    for layer in group:
                        hidden_states, context = layer(
                            hidden_states=hidden_states, context=context, mhc_recompute_manager=manager, **layer_kwargs
                        )
                    if manager is not None:
                        manager.discard_outputs_and_register_recompute(hidden_states)
        if self.post_process:
            hidden_states = contract_streams(hidden_states, self.num_streams)
            if self.final_layernorm is not None:
                hidden_states = self.final_layernorm(hidden_states)
            hidden_states = megatron_utils.make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)
        elif len(self.layers) == 0:
            # as megatron's block: input and output must not be one autograd node
            hidden_states = hidden_states.clone()
        return hidden_states
