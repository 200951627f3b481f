"""Evaluation of a split on every layout: the spec's evaluation batches through megatron's
forward-only schedule, the statistics reduced by the spec (equal on every rank)."""

from __future__ import annotations

import contextlib

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_gr.models.registry import Dataset, TrainSpec
from megatron_gr.training.model_setup import unwrap
from megatron_gr.training.plan import RunPlan
from megatron_gr.training.steps import forward_step_for, schedule_shapes


def evaluate(model_chunks, spec: TrainSpec, plan: RunPlan, dataset: Dataset, which: str) -> dict[str, float]:
    """Metrics of ``which`` (valid or test) over the whole split."""
    batches = list(
        spec.evaluation_batches(
            plan, dataset, which, parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        )
    )
    # Sharded tables fetch what evaluation reads once, so batches need no exchange between
    # ranks (which may hold different numbers of batches).
    caches = contextlib.ExitStack()
    for chunk in model_chunks:
        chunk.eval()
        model = unwrap(chunk)
        if hasattr(model, "evaluation_cache"):
            caches.enter_context(model.evaluation_cache())
    outputs = []
    if batches:
        with torch.no_grad():
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step_for(spec, plan.device, training=False),
                data_iterator=iter(batches),
                model=model_chunks,
                num_microbatches=len(batches),
                **schedule_shapes(model_chunks[0].config, batches),
                forward_only=True,
            )
    caches.close()
    for chunk in model_chunks:
        chunk.train()
    # Statistics count once: from the last stage's first tensor-parallel rank.
    contributes = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    return spec.reduce_statistics(list(outputs) if contributes else [], plan)
