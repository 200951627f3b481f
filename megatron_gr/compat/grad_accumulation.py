"""megatron-core DDP's gradient accumulation into its buffers, one for-each add per backward pass.

megatron's DDP (0.16.1) hooks every parameter's gradient accumulator; each hook adds that
parameter's gradient to its slice of the gradient buffer (``main_grad.add_(grad)``) and
drops the gradient: one Python hook, a ``.data`` detach and one launch per parameter and
backward pass. Without overlapped reduction nothing reads the buffer before the backward
pass ends, so :func:`batched_main_grad_accumulation` makes the hooks only collect their
parameters and adds every gradient at the end of the pass (an autograd engine callback)
with one for-each add: the same additions, each gradient added once per pass as before
(the engine sums a parameter's incoming gradients before its accumulator runs). What it
saves is the per-parameter Python: torch's for-each add has no fast path for bf16
gradients into float32 buffers, so a bf16 run on a GPU still launches one add kernel per
parameter (67 per step in the H100 profile of docs/benchmarks/e2e.md); float32 runs get one.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from megatron_gr.compat.patching import PatchSet


@contextlib.contextmanager
def batched_main_grad_accumulation() -> Iterator[None]:
    """DDP wrappers built inside the block accumulate gradients as described above, unless
    they overlap the reduction with the backward pass or delay weight gradients (megatron's
    hooks then stay: they start reductions as buckets fill)."""
    from megatron.core.distributed import distributed_data_parallel as ddp

    patches = PatchSet()
    original = ddp.DistributedDataParallel._make_backward_post_hook

    def make_hook(self, param: torch.nn.Parameter) -> Callable:
        if self.ddp_config.overlap_grad_reduce or self.ddp_config.delay_wgrad_compute:
            return original(self, param)
        return _collecting_hook(self, param, ddp.is_graph_capturing)

    patches.set(ddp.DistributedDataParallel, "_make_backward_post_hook", make_hook,
                purpose="accumulate gradients into DDP's buffers with one for-each add per backward pass")
    try:
        yield
    finally:
        patches.restore()


def _collecting_hook(wrapper, param: torch.nn.Parameter, is_graph_capturing: Callable[[], bool]) -> Callable:
    """megatron's hook with its add deferred to :func:`_accumulate` at the end of the pass."""
    pending = wrapper.__dict__.setdefault("_pending_main_grads", {})  # id -> parameter, in hook order

    def hook(*unused):
        if is_graph_capturing() or param not in wrapper.param_to_bucket_group:
            return
        if param.grad is not None and (not param.grad_added_to_main_grad or getattr(param, "zero_out_wgrad", False)):
            if id(param) in pending:
                # A second accumulation before the add (a nested backward pass): the
                # gradients were summed first, which megatron's order does not do.
                raise RuntimeError("a parameter's gradient accumulated twice in one backward pass; "
                                   "build the model without compat.batched_main_grad_accumulation")
            if not pending:
                torch.autograd.Variable._execution_engine.queue_callback(lambda: _accumulate(pending))
            pending[id(param)] = param
        else:
            param.grad = None

    return hook


def _accumulate(pending: dict[int, torch.nn.Parameter]) -> None:
    """``main_grad += grad`` for each pending parameter (one for-each add), gradients then dropped."""
    params = list(pending.values())
    pending.clear()
    torch._foreach_add_([param.main_grad for param in params], [param.grad.data for param in params])
    for param in params:
        param.grad = None
