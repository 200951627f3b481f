"""Builds the model of this rank and wraps it as megatron trains it: Float16Module for bf16,
then DistributedDataParallel (contiguous fp32 gradient buffers, gradient reduction)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.transformer.module import Float16Module

from megatron_gr.config.errors import ConfigError
from megatron_gr.config.experiment import ExperimentConfig
from megatron_gr.config.transformer_config import GRTransformerConfig
from megatron_gr.embeddings import EmbeddingTable, PlainEmbedding
from megatron_gr.embeddings.dynamic import DynamicEmbedding, DynamicEmbeddingCollection
from megatron_gr.models.hstu_retrieval import HSTURetrievalModel
from megatron_gr.training.runtime import Runtime
from megatron_gr.training.sparse_step import dynamic_tables, with_sparse_gradient_scaling


def runtime_model_config(config: ExperimentConfig, runtime: Runtime) -> GRTransformerConfig:
    """The model config with the fields owned by other sections filled in."""
    if config.model.contextual_len > 0:
        raise ConfigError(
            "model.contextual_len > 0 needs contextual features, which the HSTU retrieval model "
            "does not take yet: set model.contextual_len=0"
        )
    return dataclasses.replace(
        config.model,
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
    )


def build_model(
    config: ExperimentConfig, runtime: Runtime, num_items: int, *, item_vocab: Optional[np.ndarray] = None
) -> list[DistributedDataParallel]:
    """Model chunks of this rank (one chunk: no virtual pipeline stages). ``item_vocab``
    (raw id of each dense id, ``UserSequences.item_vocab``) is required by tables keyed by
    raw ids: it gives the model the raw ids of its corpus."""
    model_config = runtime_model_config(config, runtime)
    pre_process = parallel_state.is_pipeline_first_stage()
    post_process = parallel_state.is_pipeline_last_stage()
    item_table = _item_table(config, model_config, runtime, num_items)
    corpus_ids = None
    if config.embeddings["item"].keyed_by_raw_ids:
        if item_vocab is None or len(item_vocab) != num_items + 1:
            raise ValueError(f"a table keyed by raw ids needs the item vocabulary (num_items + 1 = {num_items + 1} raw ids)")
        corpus_ids = torch.from_numpy(np.asarray(item_vocab[1:], dtype=np.int64))
    model = HSTURetrievalModel(
        model_config, item_table, num_items, corpus_ids=corpus_ids, pre_process=pre_process, post_process=post_process
    )
    model.to(runtime.device)
    if runtime.bf16:
        model = Float16Module(model_config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=runtime.device.type == "cuda" and runtime.world_size > 1,
        use_distributed_optimizer=False,
    )
    wrapped = DistributedDataParallel(model_config, ddp_config, model)
    tables = dynamic_tables([wrapped])
    model_config.finalize_model_grads_func = (
        with_sparse_gradient_scaling(finalize_model_grads, tables) if tables else finalize_model_grads
    )
    model_config.no_sync_func = wrapped.no_sync
    model_config.grad_sync_func = wrapped.start_grad_sync
    return [wrapped]


def _item_table(config: ExperimentConfig, model_config: GRTransformerConfig, runtime: Runtime, num_items: int) -> EmbeddingTable:
    table_config = config.embeddings["item"]
    if table_config.type == "dynamic":
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise ConfigError(
                "embeddings.item.type='dynamic' does not support pipeline parallelism yet (the first "
                "and last stages would each need the table): use pipeline_model_parallel_size=1"
            )
        if table_config.dynamic.pooling != "none":
            raise ConfigError(
                f"embeddings.item.dynamic.pooling={table_config.dynamic.pooling!r}: the item table "
                "embeds every event of a sequence, set pooling to none"
            )
        # Sharded over the data-parallel group; tensor-parallel ranks keep identical copies.
        collection = DynamicEmbeddingCollection(
            {"item": table_config},
            default_seed=config.training.seed,
            device=runtime.device,
            group=parallel_state.get_data_parallel_group(),
        )
        return DynamicEmbedding(model_config, collection, "item")
    num_embeddings = table_config.num_embeddings or num_items + 1
    if num_embeddings < num_items + 1:
        raise ConfigError(
            f"embeddings.item.num_embeddings={num_embeddings} is too small for {num_items} items "
            f"(plus the padding row): use >= {num_items + 1} or leave it unset"
        )
    return PlainEmbedding(model_config, table_config, num_embeddings)


def unwrap(chunk: torch.nn.Module) -> HSTURetrievalModel:
    while not isinstance(chunk, HSTURetrievalModel):
        chunk = chunk.module
    return chunk
