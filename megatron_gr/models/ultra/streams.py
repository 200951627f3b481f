"""Channels of ULTRA-HSTU run concurrently on a GPU: each channel's STU stack is issued on
its own CUDA stream (after the current stream's work, which produced its input), and the
current stream waits for all of them before reading their outputs. Autograd runs each
op's backward on the stream of its forward, so the backward overlaps the same way. On a
CPU, with one channel, or while torch.export traces the model, the channels simply run one
after another.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils._pytree import tree_leaves


class ChannelStreams:
    def __init__(self):
        self._streams: list[torch.cuda.Stream] = []

    def run(self, functions: Sequence[Callable[[], object]], device: torch.device) -> list:
        """Each function's result, the functions issued on separate streams on CUDA."""
        # A program traced by torch.export (serving) runs the channels one after another.
        if device.type != "cuda" or len(functions) < 2 or torch.compiler.is_exporting():
            return [function() for function in functions]
        while len(self._streams) < len(functions):
            self._streams.append(torch.cuda.Stream(device=device))
        current = torch.cuda.current_stream(device)
        results = []
        for stream, function in zip(self._streams, functions):
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                results.append(function())
        for stream in self._streams[: len(functions)]:
            current.wait_stream(stream)
        for leaf in tree_leaves(results):
            if isinstance(leaf, torch.Tensor) and leaf.is_cuda:
                leaf.record_stream(current)  # allocated on a side stream, freed after the current one reads it
        return results
