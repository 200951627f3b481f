"""HSTU attention across the ranks of a context-parallel group.

SiLU attention has no softmax: the contributions of different keys to a query simply add,
so a rank can compute its queries against keys gathered from every rank and the results
need no rescaling or merging. Per STU layer and micro-batch:

    forward    K|V of the rank's split-sequence tokens --all-gather--> every rank;
               each query segment's keys picked from local + gathered rows (``key_source``);
               attention of the local queries against them (any kernel, mask in global
               positions: :class:`~megatron_gr.ops.key_layout.KeyLayout`)
    backward   the keys gathered again (nothing but the local q, k, v is kept between the
               passes); dq, dkeys, dvalues from the kernel's backward; key gradients summed
               back into local rows and gathered slots, the slots reduce-scattered to
               their owners

Key gradients are summed in float32 (16-bit partial sums from several ranks would be
rounded once more than the single-rank kernel's) and without atomics. The gathered keys and
their gradients are O(L) buffers on every rank (L the longest split sequence), alive during
one layer's attention; a ring exchange overlapped with compute would bound them by O(L / CP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_gr.ops.hstu_attention import hstu_attention, hstu_attention_backward
from megatron_gr.ops.key_layout import KeyLayout


@dataclass
class ContextAttention:
    """The exchange plan of one micro-batch on one rank (device tensors), shared by every
    STU layer: see :class:`~megatron_gr.transformer.context_parallel.split.ContextSplit`."""

    group: dist.ProcessGroup
    key_layout: KeyLayout
    key_source: torch.Tensor
    """``[Tk]`` row of each key in ``cat([local rows, gathered rows])``."""
    first_slots: torch.Tensor
    """Keys whose rows are distinct (every sequence's first segment, whole sequences)..."""
    second_slots: torch.Tensor
    """...and the rest (second segments), also distinct among themselves."""
    send_index: torch.Tensor
    """``[n]`` local rows this rank contributes to the all-gather."""
    send_len: int
    """Rows per rank in the all-gather (the most any rank contributes)."""
    num_local: int
    """Local rows (the rank's tokens plus sequence-parallel padding)."""

    def attention(self, q, k, v, offsets, **kwargs) -> torch.Tensor:
        """:func:`~megatron_gr.ops.hstu_attention.hstu_attention` of the local queries against
        the keys of all ranks; same arguments (``offsets`` are the local query segments)."""
        bias = kwargs.get("relative_bias")
        weights = (bias.position_weights, bias.time_weights) if bias is not None else (None, None)
        return _ContextParallelAttention.apply(q, k, v, *weights, offsets, self, kwargs)

    def gather_keys(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local ``[T, H, Dqk]`` / ``[T, H, Dv]`` -> the keys and values of every query segment
        ``[Tk, H, D]``."""
        dqk, size = k.shape[2], self.group.size()
        # Local rows, then the gathered ones: K and V side by side, one collective for both.
        rows = k.new_empty(self.num_local + self.send_len * size, k.shape[1], dqk + v.shape[2])
        rows[: self.num_local, :, :dqk] = k
        rows[: self.num_local, :, dqk:] = v
        if self.send_len:
            send = rows.new_zeros(self.send_len, *rows.shape[1:])
            send[: self.send_index.numel()] = rows[self.send_index]
            dist.all_gather_into_tensor(rows[self.num_local :], send, group=self.group)
        keys = rows[self.key_source]
        return keys[..., :dqk], keys[..., dqk:]

    def scatter_key_grads(self, dk: torch.Tensor, dv: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of the gathered keys ``[Tk, H, D]`` -> gradients of the local rows: each
        key's gradient added to its row, the gathered rows' sums reduce-scattered to the
        ranks that own them."""
        dqk, size = dk.shape[2], self.group.size()
        accumulate = torch.promote_types(dk.dtype, torch.float32)
        total = dk.new_zeros(self.num_local + self.send_len * size, dk.shape[1], dqk + dv.shape[2], dtype=accumulate)
        first, second = self.first_slots, self.second_slots
        for grad, columns in ((dk, slice(0, dqk)), (dv, slice(dqk, None))):
            rows = total[:, :, columns]
            rows.index_copy_(0, self.key_source[first], grad[first].to(accumulate))
            rows.index_add_(0, self.key_source[second], grad[second].to(accumulate))  # distinct rows: no races
        local = total[: self.num_local]
        if self.send_len:
            mine = total.new_empty(self.send_len, *total.shape[1:])
            dist.reduce_scatter_tensor(mine, total[self.num_local :], group=self.group)
            local.index_add_(0, self.send_index, mine[: self.send_index.numel()])
        local = local.to(dtype)
        return local[..., :dqk], local[..., dqk:]


class _ContextParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, position_weights, time_weights, offsets, exchange: ContextAttention, kwargs: dict):
        keys, values = exchange.gather_keys(k, v)
        out = hstu_attention(q, keys, values, offsets, key_layout=exchange.key_layout, **kwargs)
        ctx.save_for_backward(q, k, v, offsets)
        ctx.exchange, ctx.kwargs = exchange, kwargs
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, offsets = ctx.saved_tensors
        exchange: ContextAttention = ctx.exchange
        keys, values = exchange.gather_keys(k, v)
        dq, dkeys, dvalues, d_pos, d_time = hstu_attention_backward(
            grad_out, q, keys, values, offsets, key_layout=exchange.key_layout, **ctx.kwargs
        )
        del keys, values  # before the key gradients' buffers
        dk, dv = exchange.scatter_key_grads(dkeys, dvalues, k.dtype)
        return dq, dk, dv, d_pos, d_time, None, None, None

