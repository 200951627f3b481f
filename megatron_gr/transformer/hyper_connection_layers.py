"""Layers whose sublayers sit between hyper-connections instead of plain residual adds.

Each takes and returns the n residual streams ``[s, b, n C]``; around every sublayer F
(with its pre-norm)::

    u, h_post, h_res = pre(streams)           # mappings, then aggregate(streams, h_pre)
    y, bias          = F(norm(u))
    streams          = merge(streams, h_res, h_post, y, bias)          # bias-dropout-add

With an :class:`MHCRecomputeManager` (passed by the block as ``mhc_recompute_manager``)
the two hyper-connection steps (pre with the norm, merge) run without keeping their
activations. The merge's dropout is keyed (``dropout_sites``): a replay draws its mask again.

A block that fuses the merges (``mhc_defer_merge=True``) passes and receives the streams as
:mod:`megatron_gr.transformer.mhc_pending` forms: a layer then leaves its last merge
pending, and the next sublayer runs it (inside its pre op with ``mhc_fuse_merge_pre``:
``merge_pre``), the first sublayer's pre op reads the block input (``expand_pre``) and the
last merge runs inside the contraction, so the fused kernels move the streams fewer times.
The ops, their order and the dropout masks (keyed, carried with the pending merge) are the
same either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_gr.ops.backend import KernelBackend
from megatron_gr.ops.keyed_dropout import DropoutKeys
from megatron_gr.transformer.dropout_sites import MHC_MERGE_ATTENTION, MHC_MERGE_MLP, layer_site, site_keys
from megatron_gr.transformer.hyper_connection import HyperConnectionModule
from megatron_gr.transformer.layer_init import layer_init_scope
from megatron_gr.transformer.mhc_pending import BlockInput, PendingMerge, Streams, materialize, token_count
from megatron_gr.transformer.mhc_recompute import MHCRecomputeManager
from megatron_gr.transformer.stu_layer import STULayer, STULayerSubmodules, jagged_params

# A sublayer: normalised input [s, b, C] -> (output [s, b, C], bias [C] or None).
Sublayer = Callable[[torch.Tensor], tuple[torch.Tensor, Optional[torch.Tensor]]]


def hyper_connected(
    connection: HyperConnectionModule,
    norm: Callable[[torch.Tensor], torch.Tensor],
    sublayer: Sublayer,
    streams: Streams,
    *,
    dropout_p: float,
    recompute: Optional[MHCRecomputeManager],
    dropout_keys: Optional[DropoutKeys] = None,
) -> PendingMerge:
    """One sublayer with its hyper-connection: its pre op on ``streams`` (a tensor, the
    block input, or the previous sublayer's pending merge: run first, or in the same op with
    ``mhc_fuse_merge_pre``), the
    sublayer, and its merge left pending (:func:`finish` or the next sublayer runs it);
    ``dropout_keys``: the merge's, needed when its dropout is active."""
    run = runner(recompute)
    if isinstance(streams, PendingMerge) and not connection.config.mhc_fuse_merge_pre:
        streams = materialize(streams, run)  # the merge alone, then the pre op below
    if isinstance(streams, PendingMerge):
        previous = streams

        def merge_pre(x, mix, post, y):
            merged, u, h_post, h_res = connection.merge_pre(x, mix, post, y, previous.bias,
                                                            dropout_p=previous.dropout_p,
                                                            dropout_keys=previous.dropout_keys)
            return merged, norm(u), h_post, h_res

        entered, normed, h_post, h_res = run(merge_pre, *previous.tensors())
    else:
        entered = streams.hidden if isinstance(streams, BlockInput) else streams
        pre_op = connection.expand_pre if isinstance(streams, BlockInput) else connection.pre

        def pre(x):
            u, post, res = pre_op(x)
            return norm(u), post, res

        normed, h_post, h_res = run(pre, entered)
    output, bias = sublayer(normed)
    return PendingMerge(connection, entered, h_res, h_post, output, bias, dropout_p, dropout_keys)

def finish(pending: PendingMerge, *, defer: bool, recompute: Optional[MHCRecomputeManager]) -> Streams:
    """A layer's result: its pending merge for a block that fuses merges (``defer``), else
    the merged streams."""
    return pending if defer else materialize(pending, runner(recompute))


def runner(recompute: Optional[MHCRecomputeManager]):
    """How a hyper-connection step runs: through the recompute manager's checkpoint, or
    plainly."""
    return recompute.checkpoint if recompute is not None else _call


def _call(function, *args):
    return function(*args)


@dataclass
class HyperConnectionSTULayerSubmodules(STULayerSubmodules):
    hyper_connection: Union[ModuleSpec, type] = HyperConnectionModule


class HyperConnectionSTULayer(STULayer):
    """The STU layer with its one sublayer (norm, attention, gating, output projection)
    between hyper-connections."""

    def __init__(self, config, submodules: HyperConnectionSTULayerSubmodules, layer_number: int = 1,
                 pg_collection=None, vp_stage: Optional[int] = None, *,
                 backend: KernelBackend = KernelBackend.PYTORCH, init_seed: Optional[int] = None):
        with layer_init_scope(config, layer_number, pg_collection, vp_stage, init_seed):
            super().__init__(config, submodules, layer_number, pg_collection, vp_stage, backend=backend)
            self.hyper_connection = build_module(submodules.hyper_connection, config=config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        context: Optional[torch.Tensor] = None,
        packed_seq_params=None,
        mhc_recompute_manager: Optional[MHCRecomputeManager] = None,
        mhc_defer_merge: bool = False,
        **unused,
    ):
        """``hidden_states`` the streams ``[T, 1, n C]`` (``[T / tp, 1, n C]`` under sequence
        parallelism), or a fusing block's :mod:`~megatron_gr.transformer.mhc_pending` form.
        Returns ``(streams, context)``; with ``mhc_defer_merge`` the streams are this layer's
        pending merge."""
        params = jagged_params(packed_seq_params)
        pending = hyper_connected(
            self.hyper_connection,
            self.input_layernorm,
            lambda normed: (self.attention(normed, params), None),
            hidden_states,
            dropout_p=0.0,  # the STU sublayer applies hidden_dropout before its output projection
            recompute=mhc_recompute_manager,
        )
        return finish(pending, defer=mhc_defer_merge, recompute=mhc_recompute_manager), context


@dataclass
class HyperConnectionTransformerLayerSubmodules(TransformerLayerSubmodules):
    hyper_connection: Union[ModuleSpec, type] = HyperConnectionModule


class HyperConnectionTransformerLayer(TransformerLayer):
    """megatron's transformer layer (self attention, MLP, their pre-norms) with a
    hyper-connection around each of its two sublayers. megatron-core 0.16.1 has no
    hyper-connection hooks, so ``forward`` is ours; the submodules are megatron's."""

    def __init__(self, config, submodules: HyperConnectionTransformerLayerSubmodules, layer_number: int = 1,
                 hidden_dropout: Optional[float] = None, pg_collection=None, vp_stage: Optional[int] = None, *,
                 init_seed: Optional[int] = None):
        with layer_init_scope(config, layer_number, pg_collection, vp_stage, init_seed):
            super().__init__(config, submodules, layer_number, hidden_dropout, pg_collection, vp_stage)
            if not isinstance(self.cross_attention, IdentityOp):
                raise ValueError("HyperConnectionTransformerLayer has no cross attention: leave that slot IdentityOp")
            self.attention_hyper_connection = build_module(submodules.hyper_connection, config=config)
            self.mlp_hyper_connection = build_module(submodules.hyper_connection, config=config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
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
        mhc_recompute_manager: Optional[MHCRecomputeManager] = None,
        mhc_defer_merge: bool = False,
        **unused,
    ):
        """``hidden_states`` the streams ``[s, b, n C]`` (or a fusing block's form, as the STU
        layer's); the other arguments as megatron's ``TransformerLayer``. Returns
        ``(streams, context)``."""
        if inference_context is not None:
            raise NotImplementedError("HyperConnectionTransformerLayer does not support inference contexts yet")

        keys = {
            kind: self._merge_dropout_keys(packed_seq_params, hidden_states, kind)
            for kind in (MHC_MERGE_ATTENTION, MHC_MERGE_MLP)
        }

        def attention(normed):
            return self.self_attention(
                normed,
                attention_mask=attention_mask,
                rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rotary_pos_cos,
                rotary_pos_sin=rotary_pos_sin,
                rotary_pos_cos_sin=rotary_pos_cos_sin,
                attention_bias=attention_bias,
                packed_seq_params=packed_seq_params,
                sequence_len_offset=sequence_len_offset,
            )

        pending = hyper_connected(
            self.attention_hyper_connection, self.input_layernorm, attention, hidden_states,
            dropout_p=self.hidden_dropout, recompute=mhc_recompute_manager, dropout_keys=keys[MHC_MERGE_ATTENTION],
        )
        pending = hyper_connected(
            self.mlp_hyper_connection, self.pre_mlp_layernorm, lambda normed: self.mlp(normed, padding_mask=padding_mask),
            finish(pending, defer=mhc_defer_merge, recompute=mhc_recompute_manager), dropout_p=self.hidden_dropout,
            recompute=mhc_recompute_manager, dropout_keys=keys[MHC_MERGE_MLP],
        )
        return finish(pending, defer=mhc_defer_merge, recompute=mhc_recompute_manager), context

    def _merge_dropout_keys(self, params, streams: Streams, kind: int) -> Optional[DropoutKeys]:
        """Keys of one merge's dropout over this rank's ``s b`` tokens (None without
        dropout). Drawn before the merge runs, so a recomputed merge reuses them."""
        if not (self.training and self.hidden_dropout > 0):
            return None
        num_tokens, device = token_count(streams)
        return site_keys(params, layer_site(self.layer_number, kind), num_tokens=num_tokens, device=device,
                         local=True)
