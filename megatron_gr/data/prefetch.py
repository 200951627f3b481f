"""The next optimizer step's micro-batches, built and copied to the device while this step runs.

A training stream (``TrainingBatches``) builds a step's micro-batches on the host (numpy
gathers of the users' windows) and the forward step copies each to the device as it starts.
On a GPU both sit between two steps' kernels: the device waits. :class:`PrefetchingStream`
wraps the stream: a worker thread builds step k + 1 while step k runs, pins the tensors
and copies them on a side CUDA stream; ``next_step`` hands out batches already on the
device (the compute stream waits for their copy event, no host synchronisation).

The wrapped stream's position runs one step ahead; :attr:`consumed_samples` and
:meth:`state_dict` report the position of the steps handed out, and
:meth:`load_state_dict` drops the step built ahead, so checkpoints and resumed runs see
exactly the batches of an unwrapped stream.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Optional

import torch

from megatron_gr.data.jagged import JaggedBatch


class PrefetchingStream:
    """A training stream whose next step is built (and, on CUDA, copied) ahead."""

    def __init__(self, stream, device: torch.device, *, background: bool = True):
        self.stream = stream
        self.background = background  # False: each step built (and copied) when asked for
        self.device = torch.device(device)
        self.consumed_samples = stream.consumed_samples
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._thread: Optional[threading.Thread] = None
        self._ready: Optional[tuple] = None  # (batches, copy event, consumed samples after them)
        self._error: Optional[BaseException] = None

    def __getattr__(self, name):  # micro_batch_size, global_batch_size, ... of the wrapped stream
        if name == "stream":
            raise AttributeError(name)
        return getattr(self.stream, name)

    def next_step(self) -> list[JaggedBatch]:
        if not self.background:
            self._build()
        else:
            if self._thread is None:
                self._start()
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        batches, event, consumed = self._ready
        self._ready = None
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for batch in batches:  # the copies were allocated on the side stream
                for tensor in _tensors(batch):
                    tensor.record_stream(current)
        self.consumed_samples = consumed
        self._start()  # the step after this one, while this one runs
        return batches

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self._drop_prefetched()
        self.stream.load_state_dict(state)
        self.consumed_samples = self.stream.consumed_samples

    def close(self) -> None:
        """Waits for the step being built (the wrapped stream then stands one step ahead)."""
        self._drop_prefetched()

    def _drop_prefetched(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._ready, self._error = None, None

    def _start(self) -> None:
        if not self.background:
            return
        self._thread = threading.Thread(target=self._build, name="megatron_gr-prefetch", daemon=True)
        self._thread.start()

    def _build(self) -> None:
        try:
            batches = self.stream.next_step()
            consumed = self.stream.consumed_samples
            event = None
            if self._copy_stream is not None:
                with torch.cuda.stream(self._copy_stream):
                    batches = [_to_device(batch, self.device) for batch in batches]
                    event = torch.cuda.Event()
                    event.record(self._copy_stream)
            self._ready = (batches, event, consumed)
        except BaseException as error:  # raised again by next_step, in the training thread
            self._error = error


def _tensors(batch: JaggedBatch) -> list[torch.Tensor]:
    """The batch's device tensors (the copies made on the side stream)."""
    if not dataclasses.is_dataclass(batch):
        return []
    values = [getattr(batch, f.name) for f in dataclasses.fields(batch)]
    nested = [t for value in values if isinstance(value, dict) for part in value.values() for t in _tensors(part)]
    return [value for value in values if torch.is_tensor(value) and value.device.type != "cpu"] + nested


def _to_device(batch: JaggedBatch, device: torch.device) -> JaggedBatch:
    """The batch on ``device``: each host tensor pinned, then copied without blocking; the
    offsets also stay on the host (``JaggedBatch.host_offsets``, as ``JaggedBatch.to`` keeps
    them: context parallelism plans from them without waiting for the device)."""
    if not dataclasses.is_dataclass(batch):  # a tensor leaf; counts (kept_tokens) stay as they are
        return batch.to(device) if torch.is_tensor(batch) else batch
    moved = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if torch.is_tensor(value) and value.device.type == "cpu" and f.name != "host_offsets":
            value = value.pin_memory().to(device, non_blocking=True)
        elif isinstance(value, dict):  # ULTRA-HSTU's ChannelBatch: one batch per channel
            value = {key: _to_device(part, device) for key, part in value.items()}
        moved[f.name] = value
    if hasattr(batch, "offsets_on_host"):  # retrieval's JaggedBatch, ranking's RankingBatch
        moved["host_offsets"] = batch.offsets_on_host()
    return dataclasses.replace(batch, **moved)
