"""The dynamic tables of a model, stepped together with megatron's dense optimizer.

Megatron owns the dense parameters; the dynamic tables' rows are not parameters (their
number changes), so their gradients bypass DDP and megatron's optimizer. To train exactly
as a dense table would, they get the same treatment at the same moments:

- ``finalize_model_grads`` divides dense gradients by the global token count
  (``calculate_per_token_loss``); :func:`with_sparse_gradient_scaling` applies the same
  factor to the rows' gradients;
- clipping uses the norm of dense and row gradients together, and scales both;
- a step megatron skips (non-finite gradients) updates no row either; otherwise the rows
  follow the dense learning rate schedule (unless their table sets its own ``lr``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

from megatron_gr.embeddings.dynamic import PhysicalTable, collections_of


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

    def step(self, optimizer) -> tuple[bool, float | None]:
        """megatron's optimizer step (as ``ChainedOptimizer.step``) with the rows included
        in the gradient norm, clipping and update. Returns (updated, grad norm)."""
        if not self.tables:
            updated, grad_norm, _ = optimizer.step()
            return updated, grad_norm
        if optimizer.prepare_grads():  # non-finite gradients: megatron skips the step
            for table in self.tables:
                table.discard_step()
            return False, None
        dense_norm = float(optimizer.get_grad_norm() or 0.0)
        sparse_square = torch.stack([table.gradient_square_sum() for table in self.tables]).sum()
        dist.all_reduce(sparse_square, group=self.group)
        total_norm = math.sqrt(dense_norm**2 + float(sparse_square))
        clip = optimizer.config.clip_grad
        if clip > 0.0:
            # As ChainedOptimizer.step clips: every part's (main) parameters by the one norm.
            for part in getattr(optimizer, "chained_optimizers", [optimizer]):
                if getattr(part, "is_stub_optimizer", False):  # a part with no parameters here
                    continue
                params = part.get_parameters()
                if params:
                    decoupled = getattr(part.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False)
                    clip_grad_by_total_norm_fp32(params, clip, total_norm, use_decoupled_grad=decoupled)
            coefficient = clip / (total_norm + 1.0e-6)
            if coefficient < 1.0:
                for table in self.tables:
                    table.scale_gradients(coefficient)
        updated = optimizer.step_with_ready_grads()
        lr = optimizer.param_groups[0]["lr"]
        for table in self.tables:
            if updated:
                table.apply_step(lr)
            else:
                table.discard_step()
        return updated, total_norm

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
