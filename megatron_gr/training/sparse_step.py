"""The dynamic tables of a model, stepped together with megatron's dense optimizer.

Megatron owns the dense parameters; the dynamic tables' rows are not parameters (their
number changes), so their gradients bypass DDP and megatron's optimizer. To train exactly
as a dense table would, they get the same treatment at the same moments:

- ``finalize_model_grads`` divides dense gradients by the global token count
  (``calculate_per_token_loss``); :func:`with_sparse_gradient_scaling` applies the same
  factor to the rows' gradients;
- clipping uses the norm of dense and row gradients together, and scales both;
- a skipped step (non-finite gradients, loss or norm: see ``nonfinite.py``) updates no row
  either; otherwise the rows follow the dense learning rate schedule (unless their table
  sets its own ``lr``).

Without dynamic tables the same step runs with the dense part only, so the non-finite checks
cover every run.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_gr.compat import clip_grads_and_step, prepare_grads_and_norm
from megatron_gr.embeddings.dynamic import PhysicalTable, collections_of
from megatron_gr.training.nonfinite import any_rank


def dynamic_tables(model_chunks) -> list[PhysicalTable]:
    return [table for chunk in model_chunks for c in collections_of(chunk) for table in c.tables.values()]


def with_sparse_gradient_scaling(finalize: Callable, tables: list[PhysicalTable]) -> Callable:
    """``finalize`` (megatron's ``finalize_model_grads``) that also scales the tables' row
    gradients by 1 / the global token count it computes (it all-reduces ``num_tokens`` in
    place)."""

    def finalize_dense_and_sparse(model, num_tokens=None, **kwargs):
        finalize(model, num_tokens, **kwargs)
        if num_tokens is not None and float(num_tokens) > 0:
            for table in tables:
                table.scale_gradients(1.0 / float(num_tokens))

    return finalize_dense_and_sparse


class SparseTables:
    """Steps a megatron optimizer and the model's dynamic tables as one optimizer."""

    def __init__(self, model_chunks):
        self.tables = dynamic_tables(model_chunks)
        # A row lives on one data- or context-parallel rank: its norm share is summed over
        # that group (tensor-parallel ranks hold copies and must not count them twice).
        self.group = parallel_state.get_data_parallel_group(with_context_parallel=True) if self.tables else None
        self.device = _device_of(model_chunks, self.tables)

    def step(self, optimizer, *, loss_is_finite: bool = True) -> tuple[bool, float]:
        """megatron's optimizer step (as ``ChainedOptimizer.step``) with the rows included
        in the gradient norm, clipping and update. Returns (updated, grad norm).

        The step is skipped (no weight and no row moves) when megatron's ``prepare_grads``
        finds non-finite gradients, when the loss is not finite (``loss_is_finite``, the same
        on every rank) or when the joint gradient norm is not finite; every rank takes the
        same decision (:func:`~megatron_gr.training.nonfinite.any_rank`)."""
        found_inf, dense_norm = prepare_grads_and_norm(optimizer)  # megatron's own check (with a loss scaler)
        total_norm = self._joint_grad_norm(dense_norm)
        if any_rank(found_inf or not loss_is_finite or not math.isfinite(total_norm), self.device):
            for table in self.tables:
                table.discard_step()
            return False, total_norm
        clip = optimizer.config.clip_grad
        if clip > 0.0:  # the rows by the factor megatron's clipping gives the dense gradients
            coefficient = clip / (total_norm + 1.0e-6)
            if coefficient < 1.0:
                for table in self.tables:
                    table.scale_gradients(coefficient)
        updated = clip_grads_and_step(optimizer, total_norm=total_norm)
        lr = optimizer.param_groups[0]["lr"]
        for table in self.tables:
            if updated:
                table.apply_step(lr)
            else:
                table.discard_step()
        return updated, total_norm

    def _joint_grad_norm(self, dense_norm: float) -> float:
        """The L2 norm of the dense gradients (megatron's, over its gradient-statistics
        group) and the rows' gradients together; NaN or Inf when any gradient is."""
        if not self.tables:
            return dense_norm
        sparse_square = torch.stack([table.gradient_square_sum() for table in self.tables]).sum()
        dist.all_reduce(sparse_square, group=self.group)
        return math.sqrt(dense_norm**2 + float(sparse_square))

    def statistics(self) -> dict[str, float]:
        """Counters of every table summed over the shard group, for the logs:
        ``embedding/<table>/<counter>``."""
        if not self.tables:
            return {}
        local = [table.statistics() for table in self.tables]
        names = [name for name in local[0] if name != "load_factor"]
        values = torch.tensor([[stats[name] for name in names] for stats in local], dtype=torch.float64)
        values = values.to(self.tables[0].device)
        dist.all_reduce(values, group=self.group)
        world = dist.get_world_size(self.group)
        record = {}
        for table, row in zip(self.tables, values.tolist()):
            stats = dict(zip(names, row))
            stats["load_factor"] = stats["occupancy"] / (table.capacity * world)
            record.update({f"embedding/{table.name}/{name}": value for name, value in stats.items()})
        return record


def _device_of(model_chunks, tables: list[PhysicalTable]) -> torch.device:
    """Where this rank's collectives run (NCCL needs CUDA tensors, gloo CPU ones)."""
    if tables:
        return tables[0].device
    for chunk in model_chunks:
        for param in chunk.parameters():
            return param.device
    return torch.device("cpu")
