"""The STU (HSTU) layer, built from a ``ModuleSpec`` like megatron's transformer layers.

    x̂ = LN(x)
    U, V, Q, K = split(SiLU(W_uvqk x̂ + b))                   per head: dv, dv, dqk, dqk
                                                            (ops.uvqk_activation: fused in Triton)
    A = jagged_attention(Q, K, V)                           SiLU scores, causal, + bias
    y = x + W_o dropout(LN(A) * U) + b_o                    (ops.stu_output: fused in Triton)

The layer's ``backend`` (from its spec) picks the implementation of both ops (PyTorch or
Triton). The dropout is keyed (``dropout_sites``): its mask is a function of the tokens'
keys and the features' global indices, the same on every layout.

Heads are laid out head-major in the fused projection (``[u_h v_h q_h k_h]`` for each head
h), so a column-parallel split gives every tensor-parallel rank whole heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import BaseTransformerLayer
from megatron.core.utils import divide, get_pg_rank, get_pg_size

from megatron_gr.config.transformer_config import GRTransformerConfig
from megatron_gr.ops.backend import KernelBackend, check_backend
from megatron_gr.ops.hstu_attention import hstu_attention
from megatron_gr.ops.keyed_dropout import DropoutKeys, keyed_dropout
from megatron_gr.ops.stu_output import stu_output
from megatron_gr.ops.uvqk_activation import uvqk_activation
from megatron_gr.transformer.dropout_sites import STU_OUTPUT, layer_site, site_keys
from megatron_gr.transformer.jagged_seq_params import JaggedSeqParams
from megatron_gr.transformer.layer_init import global_layer_number, layer_init_scope


@dataclass
class STULayerSubmodules:
    input_layernorm: Union[ModuleSpec, type]
    uvqk_proj: Union[ModuleSpec, type]
    # Norm over all heads' outputs (heads * dv features, split across tensor-parallel
    # ranks): built with ``tp_group`` so it can combine the statistics of every rank.
    attention_output_layernorm: Union[ModuleSpec, type]
    output_proj: Union[ModuleSpec, type]
    relative_bias: Optional[Union[ModuleSpec, type]] = None  # None: no relative bias


class STULayer(MegatronModule, BaseTransformerLayer):
    def __init__(
        self,
        config: GRTransformerConfig,
        submodules: STULayerSubmodules,
        layer_number: int = 1,
        pg_collection: Optional[ProcessGroupCollection] = None,
        vp_stage: Optional[int] = None,
        *,
        backend: KernelBackend = KernelBackend.PYTORCH,
        init_seed: Optional[int] = None,
    ):
        """``backend``: the implementation of the attention and output ops (resolved by the
        run plan, given by the spec). ``init_seed``: draw the parameters under the key of
        this layer's global number (``layer_init``) instead of the global generator."""
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.backend = check_backend(backend)
        with layer_init_scope(config, layer_number, pg_collection, vp_stage, init_seed):
            self._build(config, submodules, layer_number, pg_collection, vp_stage)

    def _build(self, config: GRTransformerConfig, submodules: STULayerSubmodules, layer_number, pg_collection, vp_stage):
        self.tp_group = pg_collection.tp
        self.layer_number = global_layer_number(config, layer_number, pg_collection, vp_stage)
        heads = config.num_attention_heads
        self.num_local_heads = divide(heads, get_pg_size(self.tp_group))
        dqk, dv = config.qk_head_dim, config.v_head_dim
        self.split_sizes = (dv, dv, dqk, dqk)

        self.input_layernorm = build_module(
            submodules.input_layernorm, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )
        self.uvqk_proj = build_module(
            submodules.uvqk_proj,
            config.hidden_size,
            heads * sum(self.split_sizes),
            config=config,
            init_method=config.init_method,
            bias=True,
            gather_output=False,
            # The bias is added by the fused activation (ops.uvqk_activation), with the SiLU.
            skip_bias_add=True,
            is_expert=False,
            tp_group=self.tp_group,
        )
        self.relative_bias = (
            build_module(submodules.relative_bias, config=config, tp_group=self.tp_group)
            if submodules.relative_bias is not None
            else None
        )
        # Normalises all heads' outputs together while each rank holds only its heads.
        self.attention_output_layernorm = build_module(
            submodules.attention_output_layernorm,
            config=config,
            hidden_size=heads * dv,
            eps=config.layernorm_epsilon,
            tp_group=self.tp_group,
        )
        self.output_proj = build_module(
            submodules.output_proj,
            heads * dv,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
            is_expert=False,
            tp_group=self.tp_group,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        context: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[JaggedSeqParams] = None,
        **unused,
    ):
        """``hidden_states`` ``[T, 1, C]`` (``[T / tp, 1, C]`` under sequence parallelism);
        ``packed_seq_params`` the batch's :class:`JaggedSeqParams`. Megatron's block also
        passes masks, rotary embeddings and inference state, which STU layers do not use.
        Returns ``(hidden_states, context)`` as megatron's layers do."""
        params = jagged_params(packed_seq_params)
        return hidden_states + self.attention(self.input_layernorm(hidden_states), params), context

    def attention(self, normed: torch.Tensor, params: JaggedSeqParams) -> torch.Tensor:
        """The sublayer without its norm and residual: ``W_o dropout(LN(A) * U) + b_o`` of
        the normalised input ``[T, 1, C]``; hyper-connection layers wrap it."""
        u, v, q, k = self.project_uvqk(normed)  # each [T, local_heads, d]
        num_tokens = u.shape[0]
        bias = self.relative_bias(params) if self.relative_bias is not None else None
        window, prefix = self.config.attention_window
        # Context parallelism: the local queries against the keys of every rank.
        attend = hstu_attention if params.context_parallel is None else params.context_parallel.attention
        attn = attend(
            q,
            k,
            v,
            params.offsets,
            max_seq_len=self.config.max_seq_len,
            alpha=self.config.alpha,
            normalizer=self.config.attention_normalizer,
            causal=True,
            max_attn_len=window,
            contextual_len=self.config.contextual_len,
            num_targets=params.num_targets,
            global_prefix_len=prefix,
            relative_bias=bias,
            max_len=params.max_len,
            kernel=self.backend,
        )  # [T, local_heads, dv]
        norm, p = self.attention_output_layernorm, self.config.hidden_dropout
        keys = self._output_dropout_keys(params, num_tokens, attn.device) if self.training and p > 0 else None
        if get_pg_size(self.tp_group) == 1:
            gated = stu_output(
                attn, u, norm.weight, norm.bias, eps=norm.eps, dropout_p=p, training=self.training,
                dropout_keys=keys, kernel=self.backend,
            )  # [T, heads * dv]
        else:
            # The fused op normalises over the heads it is given; with heads split over
            # ranks the norm must combine every rank's statistics.
            gated = norm(attn.reshape(num_tokens, -1)) * u.reshape(num_tokens, -1)
            gated = keyed_dropout(gated, keys, p=p, training=self.training, kernel=self.backend)
        out, _ = self.output_proj(gated.unsqueeze(1))
        return out

    def project_uvqk(self, normed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(U, V, Q, K)`` of ``SiLU(W_uvqk x̂ + b)``, each ``[T, local_heads, d]``, one method
        so that a layer may recompute them in the backward instead of keeping them."""
        projected, bias = self.uvqk_proj(normed)
        return uvqk_activation(projected, bias, heads=self.num_local_heads, split_sizes=self.split_sizes,
                               kernel=self.backend)

    def _output_dropout_keys(self, params: JaggedSeqParams, num_tokens: int, device: torch.device) -> DropoutKeys:
        """Features are numbered over all heads: this rank's first is its first head's."""
        first_feature = get_pg_rank(self.tp_group) * self.num_local_heads * self.config.v_head_dim
        return site_keys(params, layer_site(self.layer_number, STU_OUTPUT), num_tokens=num_tokens, device=device,
                         local=False, feature_offset=first_feature)


def jagged_params(packed_seq_params) -> JaggedSeqParams:
    if not isinstance(packed_seq_params, JaggedSeqParams):
        raise ValueError("STU layers need the batch's JaggedSeqParams as packed_seq_params")
    return packed_seq_params
