"""The dynamic tables of a model, stepped together with megatron's dense optimizer.

Megatron owns the dense parameters; the dynamic tables' rows are not parameters (their
number changes), so their gradients bypass DDP and megatron's optimizer. To train exactly
as a dense table would, they get the same treatment at the same moments:

- the dense gradients are divided by the global token count (``calculate_per_token_loss``;
  :func:`per_token_finalize` does megatron's division on the device) and the rows'
  gradients by the same factor;
- clipping uses the norm of dense and row gradients together, and scales both;
- a skipped step (non-finite gradients, loss or norm: see ``nonfinite.py``) updates no row
  either; otherwise the rows follow the dense learning rate schedule (unless their table
  sets its own ``lr``).

Without dynamic tables the same step runs with the dense part only, so the non-finite checks
cover every run.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel.utils import get_pp_last_rank

from megatron_gr.compat import clip_grads_and_step, prepare_grads_and_norm
from megatron_gr.embeddings.dynamic import PhysicalTable, collections_of
from megatron_gr.embeddings.dynamic.table import STATISTICS
from megatron_gr.training.host_copy import HostCopy
from megatron_gr.training.nonfinite import any_rank


def dynamic_tables(model_chunks) -> list[PhysicalTable]:
    return [table for chunk in model_chunks for c in collections_of(chunk) for table in c.tables.values()]


def per_token_finalize(finalize: Callable, tables: list[PhysicalTable]) -> Callable:
    """``finalize`` (megatron's ``finalize_model_grads``) with the division by the global
    token count done on the device, for the dense gradients and the tables' rows.

    megatron divides only after reading the count on the host (``if num_tokens > 0``): one
    synchronisation per step, before the optimizer's own. Here megatron reduces the
    gradients (``num_tokens=None``), then the count is broadcast from the last pipeline stage
    and summed over data-parallel ranks as megatron does, and the gradients are multiplied
    by ``1 / max(count, 1)`` (with no token every gradient is zero, which megatron leaves as
    it is). The rows of dynamic tables get the same factor, a device tensor that their
    update kernel reads (never the host)."""

    def finalize_model_grads(model, num_tokens=None, pg_collection=None, **kwargs):
        finalize(model, None, pg_collection=pg_collection, **kwargs)
        if num_tokens is None:
            return
        if pg_collection is not None:
            pp_group, dp_group = pg_collection.pp, pg_collection.dp_cp
        else:
            pp_group = parallel_state.get_pipeline_model_parallel_group()
            dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        if dist.get_world_size(pp_group) > 1:  # on one rank both are the count as it is
            dist.broadcast(num_tokens, src=get_pp_last_rank(pp_group), group=pp_group)
        if dist.get_world_size(dp_group) > 1:
            dist.all_reduce(num_tokens, group=dp_group)
        scaling = 1.0 / num_tokens.clamp(min=1)
        for chunk in model:
            chunk.scale_gradients(scaling)
        for table in tables:
            table.scale_gradients(scaling)  # stays on the device

    return finalize_model_grads


class SparseTables:
    """Steps a megatron optimizer and the model's dynamic tables as one optimizer."""

    def __init__(self, model_chunks):
        self.tables = dynamic_tables(model_chunks)
        # A row lives on one data- or context-parallel rank: its norm share is summed over
        # that group (tensor-parallel ranks hold copies and must not count them twice).
        self.group = parallel_state.get_data_parallel_group(with_context_parallel=True) if self.tables else None
        self.device = _device_of(model_chunks, self.tables)

    def step(self, optimizer, *, loss_is_finite: Union[bool, Callable[[], bool]] = True) -> tuple[bool, float]:
        """megatron's optimizer step (as ``ChainedOptimizer.step``) with the rows included
        in the gradient norm, clipping and update. Returns (updated, grad norm).

        The step is skipped (no weight and no row moves) when megatron's ``prepare_grads``
        finds non-finite gradients, when the loss is not finite (``loss_is_finite``, the same
        on every rank) or when the joint gradient norm is not finite; every rank takes the
        same decision (:func:`~megatron_gr.training.nonfinite.any_rank`). A callable
        ``loss_is_finite`` is called once the norm is on the host: the step's one wait for the
        device, so reading the loss there costs no second wait."""
        found_inf, dense_norm = prepare_grads_and_norm(optimizer)  # megatron's own check (with a loss scaler)
        total_norm = self._joint_grad_norm(dense_norm)
        finite_loss = loss_is_finite() if callable(loss_is_finite) else loss_is_finite
        if any_rank(found_inf or not finite_loss or not math.isfinite(total_norm), self.device):
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
        return math.sqrt(dense_norm**2 + float(self._sparse_square()))

    def _sparse_square(self) -> torch.Tensor:
        """The rows' squared gradient norm over the shard group, a float64 device scalar."""
        sparse_square = torch.stack([table.gradient_square_sum() for table in self.tables]).sum()
        if dist.get_world_size(self.group) > 1:  # on one rank the sum is the total: no collective to launch
            dist.all_reduce(sparse_square, group=self.group)
        return sparse_square

    def joint_norm_on_device(self, dense_norm: torch.Tensor) -> torch.Tensor:
        """:meth:`_joint_grad_norm` from the dense norm on the device (``[1]`` float64),
        left there, in the same float64 operations: ``[1]`` float64, no host read."""
        if not self.tables:
            return dense_norm
        return (dense_norm.square() + self._sparse_square()).sqrt()

    def apply_on_device(self, dense_lr: float, *, clip_coefficient: Optional[torch.Tensor], skip: torch.Tensor) -> None:
        """The rows' update with the step's verdict still on the device: their gradients
        times ``clip_coefficient`` (the dense gradients' clip factor, 0-dim; None: no
        clipping), nothing moved where ``skip`` (0-dim) is 1. Reading a skipped verdict
        later, call :meth:`undo_skipped` before the next step's update."""
        for table in self.tables:
            if clip_coefficient is not None:
                table.scale_gradients(clip_coefficient)
            table.apply_step(dense_lr, skip=skip)

    def undo_skipped(self) -> None:
        """The step :meth:`apply_on_device` launched was skipped: the tables' step counts go back."""
        for table in self.tables:
            table.undo_step()

    def queue_statistics(self, *, occupancy: bool = True) -> Optional[HostCopy]:
        """Every table's :data:`~megatron_gr.embeddings.dynamic.table.STATISTICS` now,
        summed over the shard group, on their way to the host without a wait (for
        :meth:`statistics` later); ``occupancy=False``: without the stored rows (-1 there).
        None without tables. A collective over the shard group."""
        if not self.tables:
            return None
        values = torch.stack([table.counter_values(occupancy=occupancy) for table in self.tables])
        if dist.get_world_size(self.group) > 1:  # queued every step: no collective to launch alone
            dist.all_reduce(values, group=self.group)
        return HostCopy(values)

    def statistics(self, queued: Optional[HostCopy] = None) -> dict[str, float]:
        """Counters of every table summed over the shard group, for the logs:
        ``embedding/<table>/<counter>``; those ``queued`` (:meth:`queue_statistics`
        earlier: without ``occupancy`` and ``load_factor`` when queued without the stored
        rows, which are not those of that moment any more), or those of now (a collective,
        and a wait for the device)."""
        if not self.tables:
            return {}
        values = (queued if queued is not None else self.queue_statistics()).read()
        world = dist.get_world_size(self.group)
        record = {}
        for table, row in zip(self.tables, values.tolist()):
            stats = dict(zip(STATISTICS, row))
            if stats["occupancy"] < 0:  # queued without the stored rows
                del stats["occupancy"]
            else:
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
