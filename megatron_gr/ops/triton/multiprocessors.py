"""The size of the device, for kernels whose grids loop over row or token tiles."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (looked up once: launches ask every call); 1
    in the interpreter, so that the tests' small shapes give programs several tiles."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
