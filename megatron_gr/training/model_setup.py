"""Builds the model of this rank (its pipeline stage, its tensor-parallel slices) and wraps
it as megatron trains it: Float16Module for bf16, then DistributedDataParallel (contiguous
fp32 gradient buffers, gradient reduction or reduce-scatter for the distributed optimizer)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.transformer.module import Float16Module

from megatron_gr.compat import batched_main_grad_accumulation, megatron_collective_deprecations_silenced
from megatron_gr.models.registry import Dataset, StageRequest, TrainSpec
from megatron_gr.training.cuda_graphs import apply_cuda_graphs
from megatron_gr.training.plan import RunPlan
from megatron_gr.training.sparse_step import dynamic_tables, per_token_finalize


def build_model(plan: RunPlan, spec: TrainSpec, dataset: Dataset) -> list[DistributedDataParallel]:
    """Model chunks of this rank (one chunk: no virtual pipeline stages): the spec's stage,
    on the device, wrapped for bf16 and data parallelism."""
    model_config = plan.model_config
    model = spec.build_stage(
        StageRequest(
            plan=plan,
            dataset=dataset,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
    )
    model.to(plan.device)
    _tie_item_tables(model)  # on the device: NCCL reduces GPU tensors only
    if plan.bf16:
        model = Float16Module(model_config, model)
    ddp_config = _ddp_config(plan)
    with batched_main_grad_accumulation():  # one add per backward pass (unless reductions overlap)
        wrapped = DistributedDataParallel(model_config, ddp_config, model)
    # Per-token scaling on the device; rows of dynamic tables are not parameters: their
    # gradients get the dense ones' scaling (see sparse_step.py).
    model_config.finalize_model_grads_func = per_token_finalize(finalize_model_grads, dynamic_tables([wrapped]))
    # training.cuda_graphs: layers replayed from graphs captured now, before training.
    training = plan.config.training
    apply_cuda_graphs(
        unwrap(wrapped), mode=training.cuda_graphs, max_tokens=training.cuda_graph_max_tokens,
        micro_batch_size=training.micro_batch_size, num_slots=plan.layout.pipeline,
        sequence_parallel_size=plan.layout.tensor,
    )
    if ddp_config.overlap_grad_reduce:
        # The schedules hold reductions back until the last micro-batch and let the last
        # pipeline stages start theirs early. Without overlap, finalize_model_grads reduces
        # once, synchronously; starting a reduction here as well would reduce twice.
        model_config.no_sync_func = wrapped.no_sync
        model_config.grad_sync_func = wrapped.start_grad_sync
    return [wrapped]


def _tie_item_tables(model: torch.nn.Module) -> None:
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


def _ddp_config(plan: RunPlan) -> DistributedDataParallelConfig:
    """Gradient reduction over data- and context-parallel ranks (megatron's DDP reduces over
    both): fp32 buffers; the distributed optimizer and the overlaps where they pay off (see
    ``ParallelConfig``)."""
    parallel = plan.config.parallel
    distributed_optimizer = parallel.use_distributed_optimizer
    gpu_default = plan.device.type == "cuda" and plan.layout.data * plan.layout.context > 1
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
    with megatron_collective_deprecations_silenced():
        for chunk in hooked:
            chunk.disable_forward_pre_hook()  # synchronous all-gather of every bucket
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model under megatron's DDP and Float16Module wrappers."""
    while isinstance(chunk, (DistributedDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk
