"""``HyperConnectionTransformerBlock``: megatron's ``TransformerBlock`` for layers that
carry n residual streams.

    first pipeline stage:   hidden [s, b, C] --expand--> streams [s, b, n C]
    every stage:            streams -> layer -> ... -> layer -> streams
    last pipeline stage:    streams --contract (mean)--> [s, b, C] -> final norm (if any)

Stages in between receive and send ``[s, b, n C]``. With ``'mhc'`` in
``recompute_modules`` the layers run in recompute blocks of
``config.mhc_recompute_block_size(L)`` layers, each with its own
:class:`MHCRecomputeManager`.

With ``fuse_merges`` (the default when the hyper-connections run on the Triton backend) the
ops that run back to back are fused (:mod:`megatron_gr.transformer.mhc_pending`): the
expansion into the first sublayer's pre op, every merge into the next sublayer's pre op
(with ``config.mhc_fuse_merge_pre``; otherwise each of those merges runs alone, deferred),
the last merge into the contraction, also across mHC recompute blocks (a block that ends
on a pending merge keeps its streams and maps, so the ops and their numbers are those of
the run without recompute). A pipeline stage's last merge runs alone (the stage sends the
merged streams), and so does every merge under full-layer recompute (megatron's
checkpoint passes tensors between layers) and under ``training.cuda_graphs=layers`` (each
layer a captured unit of tensors: ``training/cuda_graphs.py`` sets ``fuse_merges`` off).

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
from megatron_gr.ops.backend import KernelBackend
from megatron_gr.transformer.hyper_connection import HyperConnectionModule, contract_streams, expand_streams
from megatron_gr.transformer.mhc_pending import BlockInput, PendingMerge, contract, materialize
from megatron_gr.transformer.mhc_recompute import MHCRecomputeManager


class HyperConnectionTransformerBlock(TransformerBlock):
    def __init__(self, config, spec, post_layer_norm: bool = True, pre_process: bool = True,
                 post_process: bool = True, pg_collection=None, vp_stage: Optional[int] = None, *,
                 fuse_merges: Optional[bool] = None):
        """``fuse_merges``: run the hyper-connection ops that follow each other as the fused
        ops (see the module docstring); None: when every hyper-connection of the block runs
        on the Triton backend (where they move fewer bytes; the PyTorch references are the
        same ops in sequence)."""
        super().__init__(config, spec, post_layer_norm, pre_process, post_process, pg_collection, vp_stage)
        self.num_streams = config.num_residual_streams
        if fuse_merges is None:
            kernels = {m.kernel for m in self.modules() if isinstance(m, HyperConnectionModule)}
            fuse_merges = kernels == {KernelBackend.TRITON}
        self.fuse_merges = fuse_merges

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
        full_recompute = self.config.recompute_granularity == "full" and self.training
        fuse = self.fuse_merges and not full_recompute
        if self.pre_process and fuse:
            state = BlockInput(_viewless(hidden_states), self.num_streams)
        else:
            state = _viewless(expand_streams(hidden_states, self.num_streams) if self.pre_process else self.input_tensor)
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
        if fuse:  # only then: a layer called as megatron's block calls it can be replaced (CUDA graphs)
            layer_kwargs["mhc_defer_merge"] = True
        contracted = False
        # As megatron's block: with tokens split over tensor-parallel ranks, dropout draws
        # from the rank's own stream.
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if self.config.sequence_parallel else nullcontext()
        with rng:
            if full_recompute:
                state = checkpointed_block_forward(
                    self, state, attention_mask=attention_mask, context=context, context_mask=context_mask,
                    rotary_pos_emb=rotary_pos_emb, attention_bias=attention_bias, packed_seq_params=packed_seq_params,
                    padding_mask=padding_mask,
                )
            else:
                recompute = self.config.recompute_mhc and self.training and torch.is_grad_enabled()
                groups = self.recompute_groups()
                for index, group in enumerate(groups):
                    manager = MHCRecomputeManager() if recompute else None
                    for layer in group:
                        state, context = layer(hidden_states=state, context=context, mhc_recompute_manager=manager,
                                               **layer_kwargs)
                    run = manager.checkpoint if manager is not None else _call
                    last = index == len(groups) - 1
                    if last and fuse and self.post_process:
                        state, contracted = contract(state, run, num_streams=self.num_streams), True
                    elif last:
                        state = materialize(state, run)  # the stage's output: the merged streams
                    if manager is None:
                        continue
                    if isinstance(state, PendingMerge):  # the next recompute block's first op merges it
                        manager.discard_outputs_and_register_recompute(
                            state.output, kept=(state.streams, state.h_res, state.h_post))
                    else:
                        manager.discard_outputs_and_register_recompute(state)
        hidden_states = state
        if self.post_process:
            if not contracted:
                hidden_states = contract_streams(hidden_states, self.num_streams)
            if self.final_layernorm is not None:
                hidden_states = self.final_layernorm(hidden_states)
            hidden_states = megatron_utils.make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)
        elif len(self.layers) == 0:
            # as megatron's block: input and output must not be one autograd node
            hidden_states = hidden_states.clone()
        return hidden_states


def _viewless(tensor: torch.Tensor) -> torch.Tensor:
    return megatron_utils.make_viewless_tensor(inp=tensor, requires_grad=True, keep_graph=True)


def _call(function, *args):
    return function(*args)
