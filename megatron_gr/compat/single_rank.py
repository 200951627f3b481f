"""megatron-core's gradient reduce-scatter and weight all-gather skipped where a rank has
no one to exchange with.

With the distributed optimizer, megatron-core 0.16.1 reduce-scatters the gradient buffer
after every backward and all-gathers the weight buffer after every optimizer step, each
inside a ``torch.distributed._coalescing_manager``, whatever the size of the group. On one
data-parallel rank the shard is the whole buffer (the collective's input and output are
the same memory): the sum or average over one rank leaves it as it is, the gather too, and
the collectives cost host time only (their Python, a launch each). :func:`skip_alone`
patches the two names ``param_and_grad_buffer`` calls them by so that on a group of one
those calls return at once; on larger groups they are megatron's own. The coalescing
manager stays megatron's: a manager with nothing recorded in it waits for nothing, and any
other collective megatron issues inside it (the all-reduce without the distributed
optimizer, or when it forces one) is still coalesced and waited for.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_gr.compat.patching import PatchSet


class FinishedWork:
    """The handle of a collective that had nothing to do (``wait`` returns at once)."""

    def wait(self) -> bool:
        return True


def _alone(group) -> bool:
    return (group.size() if group is not None else dist.get_world_size()) == 1


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.numel() == b.numel() and a.dtype == b.dtype


def reduce_scatter_skipping_alone(original):
    """megatron's ``dist_reduce_scatter_func``: nothing to do when one rank sums (or
    averages) a buffer into itself."""

    def reduce_scatter(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if _alone(group) and op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG) and _same_memory(output, input):
            return FinishedWork() if async_op else None
        return original(output, input, op=op, group=group, async_op=async_op)

    return reduce_scatter


def all_gather_skipping_alone(original):
    """megatron's ``dist_all_gather_func``: nothing to do when one rank gathers its whole
    buffer into itself."""

    def all_gather(output, input, group=None, async_op=False):
        if _alone(group) and _same_memory(output, input):
            return FinishedWork() if async_op else None
        return original(output, input, group=group, async_op=async_op)

    return all_gather


def skip_alone(patches: PatchSet) -> None:
    """Patches ``param_and_grad_buffer.dist_reduce_scatter_func`` and
    ``dist_all_gather_func`` (the gradient and weight buffer collectives of the distributed
    optimizer) with the wrappers above."""
    from megatron.core.distributed import param_and_grad_buffer as buffers

    purpose = "skip the buffer collectives on a data-parallel group of one rank"
    patches.set(
        buffers, "dist_reduce_scatter_func", reduce_scatter_skipping_alone(buffers.dist_reduce_scatter_func),
        purpose=purpose,
    )
    patches.set(
        buffers, "dist_all_gather_func", all_gather_skipping_alone(buffers.dist_all_gather_func), purpose=purpose
    )
