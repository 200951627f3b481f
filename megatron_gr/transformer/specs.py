"""Spec builders: which modules fill each slot of the layers and blocks.

Block specs are ``ModuleSpec(module=<block class>, submodules=TransformerBlockSubmodules)``;
build them with ``spec.module(config, spec, pre_process=..., post_process=..., ...)``
(megatron's ``TransformerBlock`` accepts such a spec). With hyper-connections the block
class is :class:`HyperConnectionTransformerBlock` and every layer its mHC variant.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_gr.compat import transformer_engine_available
from megatron_gr.config.transformer_config import GRTransformerConfig
from megatron_gr.transformer.hyper_connection import HyperConnectionModule
from megatron_gr.transformer.hyper_connection_block import HyperConnectionTransformerBlock
from megatron_gr.transformer.hyper_connection_layers import (
    HyperConnectionSTULayer,
    HyperConnectionSTULayerSubmodules,
    HyperConnectionTransformerLayer,
    HyperConnectionTransformerLayerSubmodules,
)
from megatron_gr.transformer.jagged_softmax_attention import JaggedSoftmaxAttention
from megatron_gr.transformer.norms import HeadParallelLayerNorm, LayerNorm
from megatron_gr.transformer.relative_bias import RelativeBucketedBias
from megatron_gr.transformer.stu_layer import STULayer, STULayerSubmodules


def get_stu_layer_spec(*, relative_attention_bias: bool, enable_hyper_connections: bool = False) -> ModuleSpec:
    """STU layer with megatron's local (non-TE) tensor-parallel linears; with
    ``enable_hyper_connections`` its sublayer sits between hyper-connections."""
    slots = dict(
        input_layernorm=LayerNorm,
        uvqk_proj=ColumnParallelLinear,
        attention_output_layernorm=HeadParallelLayerNorm,
        output_proj=RowParallelLinear,
        relative_bias=RelativeBucketedBias if relative_attention_bias else None,
    )
    if enable_hyper_connections:
        return ModuleSpec(
            module=HyperConnectionSTULayer,
            submodules=HyperConnectionSTULayerSubmodules(**slots, hyper_connection=HyperConnectionModule),
        )
    return ModuleSpec(module=STULayer, submodules=STULayerSubmodules(**slots))


def get_stu_block_spec(
    config: GRTransformerConfig, *, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None
) -> ModuleSpec:
    """The STU layers of one pipeline stage, without a final norm (retrieval L2-normalises
    the outputs instead)."""
    layer = get_stu_layer_spec(
        relative_attention_bias=config.relative_attention_bias,
        enable_hyper_connections=config.enable_hyper_connections,
    )
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return _block(config, [layer] * num_layers, layer_norm=None)


def get_transformer_layer_spec(
    *, enable_hyper_connections: bool = False, use_transformer_engine: Optional[bool] = None
) -> ModuleSpec:
    """megatron's transformer layer (self attention + MLP): the Transformer Engine spec
    when TE is installed (or asked for), else the local spec with this project's
    ``LayerNorm`` (megatron's torch-norm wrapper refuses sequence parallelism without
    apex). ``enable_hyper_connections`` puts both sublayers between hyper-connections."""
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if use_transformer_engine:
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        local = get_gpt_layer_local_spec()
        spec = ModuleSpec(
            module=TransformerLayer,
            submodules=dataclasses.replace(local.submodules, input_layernorm=LayerNorm, pre_mlp_layernorm=LayerNorm),
        )
    if not enable_hyper_connections:
        return spec
    slots = {f.name: getattr(spec.submodules, f.name) for f in dataclasses.fields(TransformerLayerSubmodules)}
    return ModuleSpec(
        module=HyperConnectionTransformerLayer,
        params=spec.params,
        submodules=HyperConnectionTransformerLayerSubmodules(**slots, hyper_connection=HyperConnectionModule),
    )


def get_transformer_block_spec(
    config: GRTransformerConfig,
    *,
    use_transformer_engine: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> ModuleSpec:
    """The transformer layers of one pipeline stage and the final norm."""
    layer = get_transformer_layer_spec(
        enable_hyper_connections=config.enable_hyper_connections, use_transformer_engine=use_transformer_engine
    )
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return _block(config, [layer] * num_layers, layer_norm=LayerNorm)


def get_jagged_transformer_layer_spec(*, enable_hyper_connections: bool = False) -> ModuleSpec:
    """megatron's local transformer layer (:func:`get_transformer_layer_spec` without
    Transformer Engine) whose self-attention takes jagged batches: its core attention is
    :class:`JaggedSoftmaxAttention` (causal within each packed sequence)."""
    spec = get_transformer_layer_spec(enable_hyper_connections=enable_hyper_connections, use_transformer_engine=False)
    attention = spec.submodules.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=JaggedSoftmaxAttention)
    )
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention))


def get_retrieval_layer_spec(config: GRTransformerConfig) -> ModuleSpec:
    """One layer of the retrieval model: STU, or a jagged transformer layer (SASRec)."""
    if config.block_type == "transformer":
        return get_jagged_transformer_layer_spec(enable_hyper_connections=config.enable_hyper_connections)
    return get_stu_layer_spec(
        relative_attention_bias=config.relative_attention_bias,
        enable_hyper_connections=config.enable_hyper_connections,
    )


def get_retrieval_block_spec(
    config: GRTransformerConfig, *, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None
) -> ModuleSpec:
    """The retrieval model's layers on one pipeline stage: STU layers without a final norm
    (:func:`get_stu_block_spec`), or jagged transformer layers with the final layer norm of
    a pre-norm transformer (SASRec)."""
    if config.block_type != "transformer":
        return get_stu_block_spec(config, vp_stage=vp_stage, pp_rank=pp_rank)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return _block(config, [get_retrieval_layer_spec(config)] * num_layers, layer_norm=LayerNorm)


def _block(config: GRTransformerConfig, layer_specs: list[ModuleSpec], layer_norm) -> ModuleSpec:
    block = HyperConnectionTransformerBlock if config.enable_hyper_connections else TransformerBlock
    return ModuleSpec(module=block, submodules=TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=layer_norm))
