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
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from megatron_gr.compat import transformer_engine_available
from megatron_gr.config.errors import ConfigError
from megatron_gr.config.transformer_config import GRTransformerConfig
from megatron_gr.ops.backend import KernelBackend
from megatron_gr.transformer.fp8.backend import fp8_backend_for, parallel_linear_classes
from megatron_gr.transformer.hyper_connection import HyperConnectionModule
from megatron_gr.transformer.hyper_connection_block import HyperConnectionTransformerBlock
from megatron_gr.transformer.hyper_connection_layers import (
    HyperConnectionSTULayer,
    HyperConnectionSTULayerSubmodules,
    HyperConnectionTransformerLayer,
    HyperConnectionTransformerLayerSubmodules,
)
from megatron_gr.transformer.jagged_softmax_attention import JaggedSoftmaxAttention
from megatron_gr.transformer.keyed_transformer_layer import KeyedTransformerLayer
from megatron_gr.transformer.norms import HeadParallelLayerNorm, LayerNorm
from megatron_gr.transformer.relative_bias import RelativeBucketedBias
from megatron_gr.transformer.stu_layer import STULayer, STULayerSubmodules


def _hyper_connection(backend: KernelBackend) -> ModuleSpec:
    return ModuleSpec(module=HyperConnectionModule, params={"backend": backend})


def get_stu_layer_spec(
    *,
    relative_attention_bias: bool,
    enable_hyper_connections: bool = False,
    backend: KernelBackend = KernelBackend.PYTORCH,
    init_seed: Optional[int] = None,
    fp8_backend: Optional[str] = None,
) -> ModuleSpec:
    """STU layer with megatron's local (non-TE) tensor-parallel linears; with
    ``enable_hyper_connections`` its sublayer sits between hyper-connections.

    ``backend`` is the resolved kernel backend of every op in the layer; ``init_seed``
    keys each layer's initial values by its global number (None: the global generator);
    ``fp8_backend`` (``native`` or ``te``) swaps the UVQK and output projections for FP8
    linears (see ``megatron_gr.transformer.fp8``).
    """
    column, row = parallel_linear_classes(fp8_backend)
    slots = dict(
        input_layernorm=LayerNorm,
        uvqk_proj=column,
        attention_output_layernorm=HeadParallelLayerNorm,
        output_proj=row,
        relative_bias=RelativeBucketedBias if relative_attention_bias else None,
    )
    params = {"backend": backend, "init_seed": init_seed}
    if enable_hyper_connections:
        return ModuleSpec(
            module=HyperConnectionSTULayer,
            params=params,
            submodules=HyperConnectionSTULayerSubmodules(**slots, hyper_connection=_hyper_connection(backend)),
        )
    return ModuleSpec(module=STULayer, params=params, submodules=STULayerSubmodules(**slots))


def get_stu_block_spec(
    config: GRTransformerConfig,
    *,
    backend: KernelBackend = KernelBackend.PYTORCH,
    init_seed: Optional[int] = None,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> ModuleSpec:
    """The STU layers of one pipeline stage, without a final norm (retrieval L2-normalises
    the outputs instead)."""
    layer = get_stu_layer_spec(
        relative_attention_bias=config.relative_attention_bias,
        enable_hyper_connections=config.enable_hyper_connections,
        backend=backend,
        init_seed=init_seed,
        fp8_backend=fp8_backend_for(config),
    )
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return _block(config, [layer] * num_layers, layer_norm=None)


def get_transformer_layer_spec(
    *,
    enable_hyper_connections: bool = False,
    use_transformer_engine: Optional[bool] = None,
    backend: KernelBackend = KernelBackend.PYTORCH,
    init_seed: Optional[int] = None,
    fp8_backend: Optional[str] = None,
) -> ModuleSpec:
    """megatron's transformer layer (self attention + MLP): the Transformer Engine spec
    when TE is installed (or asked for), else the local spec with this project's
    ``LayerNorm`` (megatron's torch-norm wrapper refuses sequence parallelism without
    apex). ``enable_hyper_connections`` puts both sublayers between hyper-connections
    (whose ops run on ``backend``; ``init_seed`` keys the layer's initial values).
    ``fp8_backend``: ``te`` runs the TE spec's linears in FP8 (megatron's recipes, from the
    config); ``native`` swaps the local spec's QKV, projection and MLP linears for this
    project's FP8 linears."""
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available() if fp8_backend is None else fp8_backend == "te"
    if fp8_backend is not None and use_transformer_engine != (fp8_backend == "te"):
        raise ConfigError(
            f"FP8 backend {fp8_backend!r} with use_transformer_engine={use_transformer_engine}: Transformer "
            "Engine's FP8 runs its own linears and the native FP8 linears replace megatron's local ones"
        )
    if use_transformer_engine:
        submodules = get_gpt_layer_with_transformer_engine_spec().submodules
    else:
        local = get_gpt_layer_local_spec()
        submodules = dataclasses.replace(local.submodules, input_layernorm=LayerNorm, pre_mlp_layernorm=LayerNorm)
        if fp8_backend == "native":
            submodules = _with_linears(submodules, *parallel_linear_classes(fp8_backend))
    spec = ModuleSpec(module=KeyedTransformerLayer, params={"init_seed": init_seed}, submodules=submodules)
    if not enable_hyper_connections:
        return spec
    slots = {f.name: getattr(spec.submodules, f.name) for f in dataclasses.fields(TransformerLayerSubmodules)}
    return ModuleSpec(
        module=HyperConnectionTransformerLayer,
        params=spec.params,
        submodules=HyperConnectionTransformerLayerSubmodules(**slots, hyper_connection=_hyper_connection(backend)),
    )


def get_transformer_block_spec(
    config: GRTransformerConfig,
    *,
    use_transformer_engine: Optional[bool] = None,
    backend: KernelBackend = KernelBackend.PYTORCH,
    init_seed: Optional[int] = None,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> ModuleSpec:
    """The transformer layers of one pipeline stage and the final norm."""
    layer = get_transformer_layer_spec(
        enable_hyper_connections=config.enable_hyper_connections,
        use_transformer_engine=use_transformer_engine,
        backend=backend,
        init_seed=init_seed,
        fp8_backend=fp8_backend_for(config),
    )
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return _block(config, [layer] * num_layers, layer_norm=LayerNorm)


def _with_linears(submodules: TransformerLayerSubmodules, column: type, row: type) -> TransformerLayerSubmodules:
    """The local spec's attention (QKV, output projection) and MLP (fc1, fc2) linears
    replaced by ``column`` / ``row``."""
    attention, mlp = submodules.self_attention, submodules.mlp
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, linear_qkv=column, linear_proj=row)
    )
    mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules, linear_fc1=column, linear_fc2=row))
    return dataclasses.replace(submodules, self_attention=attention, mlp=mlp)


def get_jagged_transformer_layer_spec(
    *,
    enable_hyper_connections: bool = False,
    backend: KernelBackend = KernelBackend.PYTORCH,
    init_seed: Optional[int] = None,
) -> ModuleSpec:
    """megatron's local transformer layer (:func:`get_transformer_layer_spec` without
    Transformer Engine) whose self-attention takes jagged batches: its core attention is
    :class:`JaggedSoftmaxAttention` (causal within each packed sequence)."""
    spec = get_transformer_layer_spec(
        enable_hyper_connections=enable_hyper_connections, use_transformer_engine=False, backend=backend,
        init_seed=init_seed,
    )
    attention = spec.submodules.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=JaggedSoftmaxAttention)
    )
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention))


def get_retrieval_block_spec(
    config: GRTransformerConfig,
    *,
    backend: KernelBackend = KernelBackend.PYTORCH,
    init_seed: Optional[int] = None,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> ModuleSpec:
    """The retrieval model's layers on one pipeline stage: STU layers without a final norm
    (:func:`get_stu_block_spec`), or jagged transformer layers with the final layer norm of
    a pre-norm transformer (SASRec)."""
    if config.block_type != "transformer":
        return get_stu_block_spec(config, backend=backend, init_seed=init_seed, vp_stage=vp_stage, pp_rank=pp_rank)
    layer = get_jagged_transformer_layer_spec(
        enable_hyper_connections=config.enable_hyper_connections, backend=backend, init_seed=init_seed
    )
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return _block(config, [layer] * num_layers, layer_norm=LayerNorm)


def _block(config: GRTransformerConfig, layer_specs: list[ModuleSpec], layer_norm) -> ModuleSpec:
    block = HyperConnectionTransformerBlock if config.enable_hyper_connections else TransformerBlock
    return ModuleSpec(module=block, submodules=TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=layer_norm))
