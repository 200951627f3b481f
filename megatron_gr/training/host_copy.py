"""A device tensor on its way to the host without a wait: the copy into pinned memory is
queued behind the work that produces the tensor, and the host reads it once the event
recorded after the copy has passed. Reading a device tensor at once (``.item()``,
``.tolist()``) would wait for everything queued so far, the next step's work included."""

from __future__ import annotations

from typing import Optional

import torch


class HostCopy:
    """``HostCopy(tensor)`` queues the copy; :meth:`read` returns the host tensor (waiting, at
    most, for the work queued before the copy). A CPU tensor is its own copy."""

    def __init__(self, tensor: torch.Tensor):
        self._ready: Optional[torch.cuda.Event] = None
        if tensor.device.type != "cuda":
            self._host = tensor
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._ready = torch.cuda.Event()
        self._ready.record()

    def read(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None
        return self._host
