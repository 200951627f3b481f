"""``training.graph_aliases``: a module's trainable parameters replaced, for one call, by
aliases made at that call (views of the parameters, no copy).

Why the CUDA-graph captures need them: an autograd node remembers the stream that was
current when it was made. A parameter's AccumulateGrad node is made once, on the default
(legacy) stream, and megatron's DDP keeps it alive (``grad_accs``, for its hooks); a
backward captured on a side stream that hands that node a gradient makes the legacy stream
wait on the capturing stream, which CUDA refuses (``cudaErrorStreamCaptureImplicit``,
pytorch issue #164302; torch >= 2.12 has an opt-in fix, the device runs 2.11). A unit run
with aliases, its gradients taken with respect to the aliases, never reaches the
parameters' nodes: the aliases' nodes are made on the capture stream. The aliases share the
parameters' memory, so a replayed graph reads the current weights.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.nn.utils.stateless import _reparametrize_module


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of ``module`` that get gradients, in the order of :func:`parameter_aliases`."""
    return [param for _, param in _trainable(module)]


@contextlib.contextmanager
def parameter_aliases(module: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside: ``module`` (and its submodules) reads fresh views of its trainable parameters;
    yields them in the order of :func:`trainable_parameters`. Tied parameters share one
    alias. Make them where the work runs (inside a capture: on its stream)."""
    named = _trainable(module)
    aliases = {name: param.view_as(param) for name, param in named}
    with _reparametrize_module(module, aliases, tie_weights=True):
        yield list(aliases.values())


def _trainable(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, param) for name, param in module.named_parameters() if param.requires_grad]
