"""megatron-core's torch_dist checkpoint save without a helper process that outlives the
trainer (megatron-core 0.16.1, any device)."""

from __future__ import annotations

import functools

from megatron_gr.compat.version import require


@functools.lru_cache(maxsize=None)
def checkpoint_writes_without_manager_process() -> None:
    """Patches ``dist_checkpointing.strategies.filesystem_async._results_queue`` (once). The
    torch_dist save strategy collects its writers' results in a queue it creates, on first
    use, as ``multiprocessing.get_context("spawn").Manager().Queue()``: a server process that
    imports the whole training program (~430 MB), lives until the interpreter exits cleanly
    and survives a ``kill -9`` or an unhandled SIGTERM of the trainer (with the spawn resource
    tracker beside it). megatron_gr saves synchronously (``dist_checkpointing.save``), where
    the queue is filled and read by the training process itself after its forked writers
    have joined, so an in-process queue does the same job without a process. (Megatron's
    asynchronous save would need the manager; megatron_gr does not use it.)"""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    require(filesystem_async, "_results_queue", purpose="save checkpoints without a manager process")
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
