"""This tree's training step with the step speed-ups of issue 15 turned off: the "reference"
rows of ``e2e_step.py`` (``--reference``), the like-with-like baseline of the fast step.

An older tree's step (``--tree``) is not a numerical baseline any more: main changed the
numbers since (keyed initial weights, keyed dropout masks, negatives drawn per global
batch). The reference step runs this tree's model, data and numerics with megatron's
step as it comes:

- megatron's gradient-norm and scaling helpers (a device read per parameter) instead of
  the for-each ones, its DTensor unwrapping per gradient, and its buffer collectives on a
  data-parallel group of one rank (all of ``compat.fast_optimizer_ops``);
- torch's for-each Adam instead of its fused kernel, the distributed optimizer's
  main-to-model copy one ``copy_`` per parameter, and its gradient hand-over sliced anew
  per parameter in every step; without the fused kernel the step is decided on the host
  (``step_verdict.HostVerdict``: a wait for the gradient norm in every step);
- megatron's division by the token count after reading it on the host (a second wait per
  step) instead of :func:`~megatron_gr.training.sparse_step.per_token_finalize` (kept with
  dynamic tables, whose rows need the same factor);
- the relative bias's per-pair path everywhere (no uniform tiles);
- no prefetching: each step's batches are built when the step asks for them.

The fast step should train as this one to the rounding of those differences (another
Adam kernel, another summation order), and be faster. Applied once per process, before
the trainer is built (``e2e_worker.py`` runs the reference rows in a process of their own).
"""

from __future__ import annotations

import contextlib
from typing import Iterator
from unittest import mock


@contextlib.contextmanager
def speedups_off() -> Iterator[None]:
    """Inside the block, trainers built are reference trainers (``e2e_worker.py`` holds it
    for the whole process)."""
    import megatron_gr.training.model_setup as model_setup
    import megatron_gr.training.optimizer_setup as optimizer_setup
    import megatron_gr.training.runtime as runtime
    import megatron_gr.training.trainer as trainer
    from megatron_gr.ops.triton import hstu_configs

    fast_finalize = model_setup.per_token_finalize

    def megatron_finalize(finalize, tables):
        return fast_finalize(finalize, tables) if tables else finalize

    # the runtime holds the fast ops from the first initialisation of a process on: release
    # them, so that the next initialisation holds the patched (empty) context, and again after
    runtime._OPTIMIZER_OPS.hold(False)
    with contextlib.ExitStack() as stack:
        stack.callback(runtime._OPTIMIZER_OPS.hold, False)
        stack.enter_context(mock.patch.object(runtime, "fast_optimizer_ops", contextlib.nullcontext))
        stack.enter_context(mock.patch.object(optimizer_setup, "use_fused_adam", lambda optimizer: 0))
        stack.enter_context(mock.patch.object(optimizer_setup, "batch_main_to_model_copies", lambda optimizer: 0))
        stack.enter_context(mock.patch.object(optimizer_setup, "reuse_main_grad_views", lambda optimizer: 0))
        stack.enter_context(mock.patch.object(model_setup, "per_token_finalize", megatron_finalize))
        stack.enter_context(mock.patch.object(trainer, "PrefetchingStream", lambda stream, device, **_: stream))
        stack.enter_context(hstu_configs.override(uniform_bias_tiles=False))
        yield
