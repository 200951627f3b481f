"""Sharded lookups: ids go to the rank that owns them, rows come back, gradients return
the same way in the backward pass.

For ``N`` ids on a rank of a shard group of ``W`` ranks::

    ids [N] -> routing keys -> dedupe -> U distinct (id, tag), occurrence counts
      -> owner rank of each (hash bits 31..0), sorted by owner
      -> all-to-all of (id, tag, count)                  [W > 1 only]
    owner: dedupe again (several ranks may ask for one id), counts summed
      -> find-or-insert + rows  [M, D]   (autograd leaf: backward stores the row gradients)
      -> rows of each request, all-to-all back            (backward: all-to-all of gradients)
    requester: rows [U, D] -> F.embedding(inverse) -> [N, D]

Gradients of repeated ids are summed by the embedding backward (per requester) and by the
owner's gather backward (over requesters) before they reach the table.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_gr.embeddings.dynamic.table import PhysicalTable
from megatron_gr.ops import hash_table
from megatron_gr.ops.pytorch.id_hash import owner_ranks


def dedupe(hashes: torch.Tensor, ids: torch.Tensor, tags: torch.Tensor, coalesced: bool):
    """Distinct (id, tag) sorted by routing key: (hashes, ids, tags, inverse, counts).

    Without coalescing the key is a bijection of the id, so distinct keys are distinct ids;
    with it, (key, tag) pairs are (keys may collide across tags, pairs cannot)."""
    if coalesced:
        pairs, inverse, counts = torch.unique(
            torch.stack([hashes, tags.to(torch.int64)], dim=1), dim=0, sorted=True, return_inverse=True, return_counts=True
        )
        unique_hashes, unique_tags = pairs[:, 0], pairs[:, 1].to(torch.int32)
    else:
        unique_hashes, inverse, counts = torch.unique(hashes, sorted=True, return_inverse=True, return_counts=True)
        unique_tags = torch.zeros(unique_hashes.numel(), dtype=torch.int32, device=ids.device)
    unique_ids = torch.empty_like(unique_hashes).scatter_(0, inverse, ids)
    return unique_hashes, unique_ids, unique_tags, inverse, counts


class _OwnedRows(torch.autograd.Function):
    """The owner's rows as a differentiable output; the backward hands the gradients to the
    table (the rows are not parameters: the sparse optimizer applies them at the step)."""

    @staticmethod
    def forward(ctx, anchor, table: PhysicalTable, ids, tags, hashes, counts):
        rows, slots = table.owned_rows(ids, tags, hashes, counts, train=True)
        ctx.table = table
        ctx.save_for_backward(slots)
        return rows

    @staticmethod
    def backward(ctx, grad):
        (slots,) = ctx.saved_tensors
        ctx.table.accumulate(slots, grad)
        return (None,) * 6


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


def _owner_rows(table: PhysicalTable, ids, tags, hashes, counts, train: bool) -> torch.Tensor:
    if train:
        anchor = torch.zeros((), device=ids.device, requires_grad=True)
        return _OwnedRows.apply(anchor, table, ids, tags, hashes, counts)
    rows, _ = table.owned_rows(ids, tags, hashes, counts, train=False)
    return rows


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
    unique_hashes, unique_ids, unique_tags, inverse, counts = dedupe(hashes, ids, tags, table.coalesced)
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world == 1:
        rows = _owner_rows(table, unique_ids, unique_tags, unique_hashes, counts, train)
        return F.embedding(inverse, rows)

    owner = owner_ranks(unique_hashes, world)
    order = torch.argsort(owner, stable=True)
    send_counts = torch.bincount(owner, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    payload = torch.stack([unique_ids, unique_tags.to(torch.int64), counts], dim=1)[order]  # [U, 3]
    received = payload.new_empty(sum(recv), 3)
    dist.all_to_all_single(received, payload, recv, send, group=group)

    r_ids, r_tags, r_counts = received[:, 0], received[:, 1].to(torch.int32), received[:, 2]
    r_hashes = hash_table.routing_keys(r_ids, r_tags if table.coalesced else None, kernel=table.kernel)
    o_hashes, o_ids, o_tags, o_inverse, _ = dedupe(r_hashes, r_ids, r_tags, table.coalesced)
    o_counts = torch.zeros(o_ids.numel(), dtype=torch.int64, device=ids.device).index_add_(0, o_inverse, r_counts)
    rows = _owner_rows(table, o_ids, o_tags, o_hashes, o_counts, train)  # [M, D]
    returned = _AllToAllRows.apply(rows[o_inverse], recv, send, group)  # [U, D], in `order`
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    return F.embedding(position[inverse], returned)
