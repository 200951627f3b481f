"""megatron's transformer layer with keyed initial values (see ``transformer/layer_init.py``)."""

from __future__ import annotations

from typing import Optional

from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_gr.transformer.layer_init import layer_init_scope


class KeyedTransformerLayer(TransformerLayer):
    """``TransformerLayer`` whose parameters are drawn under the key of its global layer
    number (``init_seed``; None: the global generator, as megatron draws them), so a
    pipeline stage builds only its own layers and they start as in a single-rank build."""

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout: Optional[float] = None,
                 pg_collection=None, vp_stage: Optional[int] = None, *, init_seed: Optional[int] = None):
        with layer_init_scope(config, layer_number, pg_collection, vp_stage, init_seed):
            super().__init__(config, submodules, layer_number, hidden_dropout, pg_collection, vp_stage)
