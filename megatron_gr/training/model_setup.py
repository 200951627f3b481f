"""Builds the model of this rank (its pipeline stage, its tensor-parallel slices) and wraps
it as megatron trains it: Float16Module for bf16, then DistributedDataParallel (contiguous
fp32 gradient buffers, gradient reduction or reduce-scatter for the distributed optimizer)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_gr.config.errors import ConfigError
from megatron_gr.config.experiment import ExperimentConfig
from megatron_gr.config.parallel_config import ParallelConfig
from megatron_gr.config.transformer_config import GRTransformerConfig
from megatron_gr.embeddings import EmbeddingTable, PlainEmbedding
from megatron_gr.embeddings.dynamic import DynamicEmbedding, DynamicEmbeddingCollection
from megatron_gr.models.hstu_retrieval import HSTURetrievalModel
from megatron_gr.models.preprocessor import InputPreprocessor
from megatron_gr.ops.triton.availability import triton_missing_reason
from megatron_gr.training.runtime import Runtime
from megatron_gr.training.sparse_step import dynamic_tables, with_sparse_gradient_scaling
from megatron_gr.transformer.specs import get_stu_layer_spec


def runtime_model_config(config: ExperimentConfig, runtime: Runtime) -> GRTransformerConfig:
    """The model config with the fields owned by other sections filled in."""
    if config.model.contextual_len > 0:
        raise ConfigError(
            "model.contextual_len > 0 needs contextual features, which the HSTU retrieval model "
            "does not take yet: set model.contextual_len=0"
        )
    if config.model.use_fused_mhc:
        reason = triton_missing_reason(runtime.device)
        if reason is not None:
            raise ConfigError(
                f"model.use_fused_mhc=true: the fused mHC kernels {reason}; set it to false on this device"
            )
    parallel = config.parallel
    return dataclasses.replace(
        config.model,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        context_parallel_size=parallel.context_parallel_size,
        context_parallel_split_threshold=parallel.context_parallel_split_threshold,
        bf16=runtime.bf16,
        params_dtype=runtime.params_dtype,
        pipeline_dtype=runtime.params_dtype,
        # Weights drawn on the CPU from one generator and then split: the same model under
        # every tensor-parallel size, and on CPU and GPU.
        use_cpu_initialization=True,
        # Jagged micro-batches hold different token counts: normalise the loss by tokens.
        calculate_per_token_loss=True,
        # Pipeline stages exchange variable-length tensors (megatron only accepts this flag
        # together with the all-to-all MoE dispatcher, even for dense models).
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
        # Free each stage's sent activations (only their autograd graph is kept) and run
        # the backward pass through megatron's direct call into the autograd engine. On the
        # CPU that direct call also keeps the compat device redirect active in backward
        # (``torch.autograd.backward`` would switch it off: see compat.py).
        deallocate_pipeline_outputs=True,
    )


def build_model(
    config: ExperimentConfig, runtime: Runtime, num_items: int, *, item_vocab: Optional[np.ndarray] = None
) -> list[DistributedDataParallel]:
    """Model chunks of this rank (one chunk: no virtual pipeline stages). ``item_vocab``
    (raw id of each dense id, ``UserSequences.item_vocab``) is required by tables keyed by
    raw ids: it gives the model the raw ids of its corpus."""
    model_config = runtime_model_config(config, runtime)
    corpus_ids = None
    if config.embeddings["item"].keyed_by_raw_ids:
        if item_vocab is None or len(item_vocab) != num_items + 1:
            raise ValueError(f"a table keyed by raw ids needs the item vocabulary (num_items + 1 = {num_items + 1} raw ids)")
        corpus_ids = torch.from_numpy(np.asarray(item_vocab[1:], dtype=np.int64))
    model = _build_stage(config, model_config, runtime, num_items, corpus_ids)
    model.to(runtime.device)
    _tie_item_tables(model)  # on the device: NCCL reduces GPU tensors only
    if runtime.bf16:
        model = Float16Module(model_config, model)
    ddp_config = _ddp_config(config.parallel, runtime)
    wrapped = DistributedDataParallel(model_config, ddp_config, model)
    # Rows of dynamic tables are not parameters: their gradients get the dense ones' scaling
    # (see sparse_step.py).
    tables = dynamic_tables([wrapped])
    model_config.finalize_model_grads_func = (
        with_sparse_gradient_scaling(finalize_model_grads, tables) if tables else finalize_model_grads
    )
    if ddp_config.overlap_grad_reduce:
        # The schedules hold reductions back until the last micro-batch and let the last
        # pipeline stages start theirs early. Without overlap, finalize_model_grads reduces
        # once, synchronously; starting a reduction here as well would reduce twice.
        model_config.no_sync_func = wrapped.no_sync
        model_config.grad_sync_func = wrapped.start_grad_sync
    return [wrapped]


def _build_stage(
    config: ExperimentConfig,
    model_config: GRTransformerConfig,
    runtime: Runtime,
    num_items: int,
    corpus_ids: Optional[torch.Tensor],
) -> HSTURetrievalModel:
    """This pipeline stage's part of the model, with the initial values it has in a
    single-rank build of the same seed.

    A single rank draws, in order: the item table, the input encodings, layers 1..L. A later
    stage draws the same sequence and drops what belongs to earlier stages, so its layers
    start where the single-rank model's do and every layout trains the same model (tensor
    parallelism already draws full weights and keeps its slice: ``use_cpu_initialization``).
    """
    pre_process = parallel_state.is_pipeline_first_stage()
    post_process = parallel_state.is_pipeline_last_stage()
    torch.manual_seed(config.training.seed)
    item_table = _item_table(config, model_config, runtime, num_items)
    first_layer = get_transformer_layer_offset(model_config, pp_rank=parallel_state.get_pipeline_model_parallel_rank())
    if not pre_process:
        InputPreprocessor(model_config)
        layer_spec = get_stu_layer_spec(
            relative_attention_bias=model_config.relative_attention_bias,
            enable_hyper_connections=model_config.enable_hyper_connections,
        )
        for number in range(1, first_layer + 1):
            build_module(layer_spec, config=model_config, layer_number=number)
    return HSTURetrievalModel(
        model_config,
        item_table if pre_process or post_process else None,
        num_items,
        corpus_ids=corpus_ids,
        pre_process=pre_process,
        post_process=post_process,
    )


def _item_table(config: ExperimentConfig, model_config: GRTransformerConfig, runtime: Runtime, num_items: int) -> EmbeddingTable:
    """The plain table over dense ids, or a dynamic one keyed by raw ids (its layout limits
    are checked at config load: ``ExperimentConfig``)."""
    table_config = config.embeddings["item"]
    if table_config.type == "dynamic":
        # Sharded over the data- and context-parallel ranks (each looks up its own tokens);
        # tensor-parallel ranks keep identical copies.
        collection = DynamicEmbeddingCollection(
            {"item": table_config},
            default_seed=config.training.seed,
            device=runtime.device,
            group=parallel_state.get_data_parallel_group(with_context_parallel=True),
        )
        return DynamicEmbedding(model_config, collection, "item")
    num_embeddings = table_config.num_embeddings or num_items + 1
    if num_embeddings < num_items + 1:
        raise ConfigError(
            f"embeddings.item.num_embeddings={num_embeddings} is too small for {num_items} items "
            f"(plus the padding row): use >= {num_items + 1} or leave it unset"
        )
    return PlainEmbedding(model_config, table_config, num_embeddings)


def _tie_item_tables(model: HSTURetrievalModel) -> None:
    """Pipeline parallelism: the first and the last stage each hold the item table. As
    megatron ties GPT's input and output embeddings: the last stage's copy starts from the
    first stage's values (zeroed, then all-reduced over the embedding group), megatron's DDP
    gives each copy its own gradient bucket (``shared_embedding``: both stages shard it the
    same way under the distributed optimizer), ``finalize_model_grads`` all-reduces their
    gradients, and the last copy is left out of the gradient norm (``shared``)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    weight = model.shared_embedding_or_output_weight()
    if weight is None:  # a middle stage
        return
    weight.shared_embedding = True
    if not model.pre_process:
        weight.shared = True
        weight.data.zero_()
    dist.all_reduce(weight.data, group=parallel_state.get_embedding_group())


def _ddp_config(parallel: ParallelConfig, runtime: Runtime) -> DistributedDataParallelConfig:
    """Gradient reduction over data- and context-parallel ranks (megatron's DDP reduces over
    both): fp32 buffers; the distributed optimizer and the overlaps where they pay off (see
    ``ParallelConfig``)."""
    data_parallel = parallel_state.get_data_parallel_world_size(with_context_parallel=True) > 1
    distributed_optimizer = parallel.use_distributed_optimizer
    gpu_default = runtime.device.type == "cuda" and data_parallel
    overlap_grad_reduce = parallel.overlap_grad_reduce
    if overlap_grad_reduce is None:
        overlap_grad_reduce = gpu_default
    overlap_param_gather = parallel.overlap_param_gather
    if overlap_param_gather is None:
        overlap_param_gather = gpu_default
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=distributed_optimizer,
        # Gathering weights during the forward pass needs weight shards to gather from.
        overlap_param_gather=overlap_param_gather and distributed_optimizer,
        bucket_size=parallel.ddp_bucket_size,
    )


@contextlib.contextmanager
def updated_weights(model_chunks):
    """Weights that reflect the last optimizer step, for evaluating, copying or saving them.

    With ``overlap_param_gather`` the distributed optimizer leaves each weight's all-gather
    to the next training forward pass (megatron's forward pre-hooks); anything else that
    reads the weights first must gather them now and keep the hooks off while it runs.
    """
    hooked = [chunk for chunk in model_chunks if getattr(chunk, "use_forward_hook", False)]
    for chunk in hooked:
        chunk.disable_forward_pre_hook()  # synchronous all-gather of every bucket
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()


def unwrap(chunk: torch.nn.Module) -> HSTURetrievalModel:
    while not isinstance(chunk, HSTURetrievalModel):
        chunk = chunk.module
    return chunk
