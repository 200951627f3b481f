"""Sharded lookups: ids go to the rank that owns them, rows come back, gradients return
the same way in the backward pass.

For ``N`` ids on a rank of a shard group of ``W`` ranks::

    ids [N] -> routing keys -> dedupe (one stable sort): U distinct (id, tag), counts
    W == 1: find-or-insert the U -> each id's row read from the table by slot  [N, D]
    W > 1:  owner rank of each distinct (hash bits 31..0), sorted by owner
      -> all-to-all of (id, tag, count)
      owner: dedupe the R requests (several ranks may ask for one id), counts summed,
        find-or-insert -> each request's row read from the table by slot  [R, D]
      -> all-to-all back                              (backward: all-to-all of gradients)
      requester: [U, D] -> each id's row              [N, D]

Where rows are read for repeated keys, the backward sums the gradients of each distinct key
with :func:`megatron_gr.ops.segment_sum.segment_sum` over the dedupe's sort: a fixed order,
so the same bits on every run, rank layout and device. A training lookup reads one number
back to the host with ``W > 1`` (the count of distinct keys, which sizes everything after
it, and the send counts); on one rank none (the distinct keys padded to ``N``, their count
kept on the device) unless admission counting needs it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist

from megatron_gr.embeddings.dynamic.table import PhysicalTable
from megatron_gr.ops import hash_table
from megatron_gr.ops.pytorch.id_hash import owner_ranks
from megatron_gr.ops.segment_sum import SortedGroups, gather_rows, segment_sum, sorted_groups


@dataclasses.dataclass
class Distinct:
    """The distinct (id, tag) of ``N`` queries, sorted by routing key, then tag."""

    hashes: torch.Tensor  # [U] int64 routing keys
    ids: torch.Tensor  # [U] int64
    tags: torch.Tensor  # [U] int32
    counts: torch.Tensor  # [U] int64 occurrences
    groups: SortedGroups  # which queries share each distinct key (groups.inverse: [N] -> U)

    @property
    def valid(self) -> Optional[torch.Tensor]:
        """U on the device when the fields above are padded to N entries, else None."""
        return self.groups.valid


def dedupe(
    hashes: torch.Tensor, ids: torch.Tensor, tags: torch.Tensor, coalesced: bool, kernel: str = "pytorch", *,
    count_on_host: bool = True,
) -> Distinct:
    """Without coalescing the key is a bijection of the id, so distinct keys are distinct ids;
    with it, (key, tag) pairs are (keys may collide across tags, pairs cannot).
    ``count_on_host=False``: no host read, the fields padded (``SortedGroups.valid``)."""
    groups = sorted_groups(hashes, tags if coalesced else None, take=(ids, tags), kernel=kernel, count_on_host=count_on_host)
    distinct_ids, distinct_tags = groups.taken
    return Distinct(groups.unique, distinct_ids, distinct_tags, groups.counts, groups)


class _TableRows(torch.autograd.Function):
    """Every query's row ``[N, D]`` read straight from the table by the slot of its distinct
    key (fresh rows initialised first). The backward sums each distinct key's gradients and
    hands them to the table (the rows are not parameters: the sparse optimizer applies them
    at the step)."""

    @staticmethod
    def forward(ctx, anchor, table: PhysicalTable, queries: Distinct):
        slots = table.find(queries.ids, queries.tags, queries.hashes, queries.counts, train=True, valid=queries.valid)
        ctx.table, ctx.groups = table, queries.groups
        ctx.save_for_backward(slots)
        return table.read(slots, queries.ids, queries.tags, index=queries.groups.inverse)

    @staticmethod
    def backward(ctx, grad):
        (slots,) = ctx.saved_tensors
        ctx.table.accumulate(slots, segment_sum(grad, ctx.groups, kernel=ctx.table.kernel))
        return None, None, None


class _GatherRows(torch.autograd.Function):
    """``rows[groups.inverse]``: ``[U, D]`` -> ``[N, D]``; the backward sums each group's
    gradients."""

    @staticmethod
    def forward(ctx, rows, groups: SortedGroups, kernel: str):
        ctx.groups, ctx.kernel = groups, kernel
        return gather_rows(rows, groups.inverse, kernel=kernel)

    @staticmethod
    def backward(ctx, grad):
        return segment_sum(grad, ctx.groups, kernel=ctx.kernel), None, None


class _AllToAllRows(torch.autograd.Function):
    """Rows ``[sum(send), D]`` -> ``[sum(recv), D]``; the backward sends gradients back."""

    @staticmethod
    def forward(ctx, rows, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = rows.new_empty(sum(recv), rows.shape[1])
        dist.all_to_all_single(out, rows.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty(sum(ctx.send), grad.shape[1])
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return back, None, None, None


def table_rows(table: PhysicalTable, queries: Distinct, *, train: bool) -> torch.Tensor:
    """Rows ``[N, D]`` of the queries behind ``queries`` on the rank that owns them;
    ``train``: insert, score and collect gradients, otherwise read only."""
    if train:
        anchor = torch.zeros((), device=queries.ids.device, requires_grad=True)
        return _TableRows.apply(anchor, table, queries)
    slots = table.find(queries.ids, queries.tags, queries.hashes, queries.counts, train=False, valid=queries.valid)
    return table.read(slots, queries.ids, queries.tags, index=queries.groups.inverse)


def sharded_lookup(
    table: PhysicalTable, ids: torch.Tensor, tags: Optional[torch.Tensor], *, group: Optional[dist.ProcessGroup], train: bool
) -> torch.Tensor:
    """Rows ``[N, D]`` float32 of ``ids`` ``[N]`` int64 (``tags`` ``[N]`` int32: the logical
    table of each id in a coalesced table, None for a table of its own). ``train``: insert,
    score and collect gradients; otherwise read only. Every rank of ``group`` must call it
    the same number of times (it exchanges ids and rows)."""
    if tags is None:
        tags = torch.zeros(ids.numel(), dtype=torch.int32, device=ids.device)
    hashes = hash_table.routing_keys(ids, tags if table.coalesced else None, kernel=table.kernel)
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world == 1:
        # One rank: nothing needs the distinct count on the host (no exchange to size), so
        # the lookup runs padded to N queries and never waits for the device.
        queries = dedupe(hashes, ids, tags, table.coalesced, table.kernel, count_on_host=not table.counts_on_device)
        return table_rows(table, queries, train=train)
    queries = dedupe(hashes, ids, tags, table.coalesced, table.kernel)

    owner = owner_ranks(queries.hashes, world)
    order = torch.argsort(owner, stable=True)
    bounds = torch.searchsorted(owner[order], torch.arange(world + 1, device=owner.device))
    send_counts = bounds[1:] - bounds[:-1]
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    payload = torch.stack([queries.ids, queries.tags.to(torch.int64), queries.counts], dim=1)[order]  # [U, 3]
    received = payload.new_empty(sum(recv), 3)
    dist.all_to_all_single(received, payload, recv, send, group=group)

    r_ids, r_tags, r_counts = received[:, 0], received[:, 1].to(torch.int32), received[:, 2]
    r_hashes = hash_table.routing_keys(r_ids, r_tags if table.coalesced else None, kernel=table.kernel)
    requests = dedupe(r_hashes, r_ids, r_tags, table.coalesced, table.kernel)
    totals = torch.zeros_like(requests.counts).index_add_(0, requests.groups.inverse, r_counts)  # over requesters
    rows = table_rows(table, dataclasses.replace(requests, counts=totals), train=train)  # [R, D]
    returned = _AllToAllRows.apply(rows, recv, send, group)  # [U, D], in `order`
    position = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return _GatherRows.apply(returned[position], queries.groups, table.kernel)
