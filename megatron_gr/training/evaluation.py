"""Full-corpus evaluation (HR@K, NDCG@K, MRR) of the valid or test split on every layout."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_gr.data.loader import evaluation_batches
from megatron_gr.data.sequences import LeaveOneOutSplit
from megatron_gr.training.metrics import NAMES, metrics_from_sums
from megatron_gr.training.model_setup import unwrap
from megatron_gr.training.steps import forward_step_for, schedule_shapes


def evaluate(
    model_chunks, split: LeaveOneOutSplit, which: str, *, max_seq_len: int, batch_size: int, device, raw_item_ids: bool = False
) -> dict[str, float]:
    """Metrics of ``which`` over all users; every rank returns the same numbers."""
    batches = list(
        evaluation_batches(
            split,
            which,
            max_seq_len=max_seq_len,
            batch_size=batch_size,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(),
            raw_item_ids=raw_item_ids,
        )
    )
    # Sharded item tables fetch the corpus once, so batches need no exchange between ranks.
    caches = contextlib.ExitStack()
    for chunk in model_chunks:
        chunk.eval()
        caches.enter_context(unwrap(chunk).evaluation_cache())
    sums = torch.zeros(1 + len(NAMES), dtype=torch.float64, device=device)
    if batches:
        with torch.no_grad():
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step_for(device, training=False),
                data_iterator=iter(batches),
                model=model_chunks,
                num_microbatches=len(batches),
                **schedule_shapes(model_chunks[0].config, batches),
                forward_only=True,
            )
        counts_here = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
        if counts_here:
            for out in outputs:
                sums += out["metric_sums"]
    caches.close()
    for chunk in model_chunks:
        chunk.train()
    # One contributor per data-parallel rank (last stage, first tensor rank): a sum over
    # all ranks gives every rank the global numbers.
    dist.all_reduce(sums)
    return metrics_from_sums(sums)
