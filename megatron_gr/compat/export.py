"""megatron-core 0.16.1 modules traced by ``torch.export`` (serving export, any device)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from megatron_gr.compat.patching import PatchSet


def _as_is(inp, requires_grad=None, keep_graph=None):
    return inp


@contextlib.contextmanager
def traceable_viewless_tensors() -> Iterator[None]:
    """``make_viewless_tensor`` returns its input while the block is traced. megatron calls it
    on every block's input and output (``TransformerBlock.forward``; ours through
    ``megatron.core.utils``) so that the pipeline schedule can free a stage's output: it
    allocates a one-element tensor and assigns the input's ``.data`` to it, which
    ``torch.export`` cannot trace (a fake tensor ends up among the program's constants).
    The values are the input's either way, and a serving program has no pipeline schedule."""
    from megatron.core import utils
    from megatron.core.transformer import transformer_block

    patches = PatchSet()
    for module in (utils, transformer_block):
        patches.set(module, "make_viewless_tensor", _as_is, purpose="export a model with torch.export")
    try:
        yield
    finally:
        patches.restore()
