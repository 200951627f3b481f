"""The FP8 linears of modules captured in CUDA graphs (``training/cuda_graphs.py``).

A CUDA graph replays the kernels and addresses of its capture, not the Python that
launched them. Four things make the FP8 linears replay as they run eagerly:

- Captured code paths (:meth:`Fp8GraphCapture.capturing`): each linear casts its weight on
  every call (the per-step cache would hand a capture a cast made outside it, or keep a
  cast made in a graph's memory pool for later eager calls), and the delayed recipe
  decides on the device whether a tensor is scaled by its own amax (the first
  quantisation) or by its history.
- Real tokens only: a graph's batch is padded to its bucket, and the padding's activations
  (those of zero inputs through the layers' biases and norms) may exceed the real tokens'.
  The amaxes taken along the tokens (per tensor, and per feature for ``rowwise``'s weight
  gradient) skip the rows whose dropout key is negative (the padding's, as ``TokenSplit``
  lays it out), so a replay scales as the eager, unpadded step.
- In-place state: amax histories and scales are updated in place (``AmaxHistory``), so a
  replay writes the tensors eager calls read.
- Untouched state (:meth:`Fp8GraphCapture.state_kept`): the eager warm-ups before a capture
  record amaxes of random inputs, so every history is copied before and written back after
  (in place): the first training step then scales as the eager first step does. The state
  tensors are allocated before, outside every graph's memory pool.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Optional

import torch

from megatron_gr.transformer.fp8.linear import Fp8LinearState


class Fp8GraphCapture:
    """The FP8 states of the linears inside ``modules`` (none: every method is a no-op)."""

    def __init__(self, modules: Iterable[torch.nn.Module]):
        found: dict[int, tuple[Fp8LinearState, torch.device]] = {}
        for module in modules:
            for sub in module.modules():
                state = getattr(sub, "fp8_state", None)
                if isinstance(state, Fp8LinearState):
                    found.setdefault(id(state), (state, sub.weight.device))
        self._states = list(found.values())

    @property
    def states(self) -> list[Fp8LinearState]:
        return [state for state, _ in self._states]

    @contextlib.contextmanager
    def capturing(self, token_keys: Optional[torch.Tensor] = None) -> Iterator[None]:
        """Inside: the linears run the code path a capture records (see the module doc);
        ``token_keys`` ``[T]``: the batch's dropout keys (negative: padding), whose
        non-negative rows alone enter the amaxes (computed here: inside a capture, on the
        device at every replay)."""
        before = [(state.graph_capture, state.token_rows) for state in self.states]
        rows = None if token_keys is None or not self._states else token_keys >= 0
        for state in self.states:
            state.graph_capture, state.token_rows = True, rows
        try:
            yield
        finally:
            for state, (capture, token_rows) in zip(self.states, before):
                state.graph_capture, state.token_rows = capture, token_rows

    def captured(self, work: Callable, token_keys: torch.Tensor) -> Callable:
        """``work`` run as captured on a batch with ``token_keys`` (emulated graphs re-run
        their work on every replay)."""
        if not self._states:
            return work

        def run(*args, **kwargs):
            with self.capturing(token_keys):
                return work(*args, **kwargs)

        return run

    @contextlib.contextmanager
    def state_kept(self) -> Iterator[None]:
        """Inside: as :meth:`capturing`; at exit every amax history and scale is what it was
        at entry, written in place. No weight cast is cached inside, none survives."""
        histories = []
        for state, device in self._states:
            for history in state.histories:
                history.allocate(device)
                histories.append(history)
        saved = [history.snapshot() for history in histories]
        try:
            with self.capturing():
                yield
        finally:
            for history, snapshot in zip(histories, saved):
                history.restore(snapshot)
