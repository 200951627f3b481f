"""ULTRA-HSTU's STU layers: the STU layer (plain or between hyper-connections) with the
attention-truncation hook and selective rematerialization.

- Truncation: each layer reads its input through :func:`attn_truncation.layer_input`, so
  the layer after the split truncates the batch and later layers see the re-packed one.
- ``config.recompute_uvqk``: ``SiLU(W_uvqk x̂ + b)`` (U, V, Q, K, the widest activation of
  the layer) runs under megatron's ``CheckpointWithoutOutput`` (driven by the
  :class:`MHCRecomputeManager`, a general replay of freed outputs): its storage is freed once
  the sublayer's output exists and refilled by recomputing it when that output's gradient
  arrives, before the attention and gating backward read it. The SiLU input is not kept
  either (the SiLU runs inside the recomputed function).
- ``config.recompute_normed_x`` (without hyper-connections): the input layer norm's output
  likewise, refilled when the layer output's gradient arrives (before the UVQK recompute,
  which reads it).

Gradients are those of the plain layer: the same ops replayed with the same RNG states.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron_gr.transformer.attn_truncation import layer_input, truncates_input
from megatron_gr.transformer.hyper_connection_layers import HyperConnectionSTULayer, runner
from megatron_gr.transformer.mhc_pending import materialize
from megatron_gr.transformer.mhc_recompute import MHCRecomputeManager
from megatron_gr.transformer.specs import get_stu_block_spec
from megatron_gr.transformer.stu_layer import STULayer, jagged_params


class _Rematerialized:
    """Recomputes U, V, Q, K in the backward when ``config.recompute_uvqk`` (mixin of an
    STU layer class). The replay is :class:`MHCRecomputeManager`'s: megatron's
    ``CheckpointWithoutOutput`` per op, and the replayed outputs pointed at the refilled
    storage so that they exist once."""

    _uvqk_recompute: Optional[MHCRecomputeManager] = None

    def _rematerializes(self, flag: bool) -> bool:
        return flag and self.training and torch.is_grad_enabled()

    def project_uvqk(self, normed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self._rematerializes(self.config.recompute_uvqk):
            return super().project_uvqk(normed)
        self._uvqk_recompute = MHCRecomputeManager()
        return self._uvqk_recompute.checkpoint(super().project_uvqk, normed)

    def attention(self, normed: torch.Tensor, params) -> torch.Tensor:
        out = super().attention(normed, params)
        recompute, self._uvqk_recompute = self._uvqk_recompute, None
        if recompute is not None:
            # U, V, Q, K are read by the attention and gating backward only, after out's gradient.
            recompute.discard_outputs_and_register_recompute(out)
        return out


class UltraSTULayer(_Rematerialized, STULayer):
    def forward(self, hidden_states: torch.Tensor, attention_mask=None, context=None, packed_seq_params=None, **kwargs):
        hidden_states, params = layer_input(self.layer_number, hidden_states, jagged_params(packed_seq_params))
        if not self._rematerializes(self.config.recompute_normed_x):
            return super().forward(hidden_states, attention_mask, context, params, **kwargs)
        recompute = MHCRecomputeManager()
        normed = recompute.checkpoint(self.input_layernorm, hidden_states)
        output = hidden_states + self.attention(normed, params)
        # The output's gradient arrives before the sublayer's: the norm is back before the
        # UVQK replay (registered on the sublayer output) reads it.
        recompute.discard_outputs_and_register_recompute(output)
        return output, context


class UltraHyperConnectionSTULayer(_Rematerialized, HyperConnectionSTULayer):
    def forward(self, hidden_states, attention_mask=None, context=None, packed_seq_params=None, **kwargs):
        params = jagged_params(packed_seq_params)
        if truncates_input(self.layer_number, params):
            # The rows are re-packed here: in a block that fuses its mHC ops (mhc_pending), the
            # merge left pending by the layer before runs first, on the rows it belongs to.
            hidden_states = materialize(hidden_states, runner(kwargs.get("mhc_recompute_manager")))
        hidden_states, params = layer_input(self.layer_number, hidden_states, params)
        return super().forward(hidden_states, attention_mask, context, params, **kwargs)


_ULTRA_LAYERS = {STULayer: UltraSTULayer, HyperConnectionSTULayer: UltraHyperConnectionSTULayer}


def get_ultra_block_spec(config, **kwargs):
    """:func:`specs.get_stu_block_spec` with ULTRA-HSTU's layers (same parameters, same
    keyed initial values)."""
    spec = get_stu_block_spec(config, **kwargs)
    layers = [dataclasses.replace(layer, module=_ULTRA_LAYERS[layer.module]) for layer in spec.submodules.layer_specs]
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, layer_specs=layers))
