"""Keyed initial values for layers: a layer's parameters are drawn from a generator seeded by
the run seed and the layer's global number, so a pipeline stage builds its own layers only
and gets the values a single-rank build of the same seed has (see ``megatron_gr.seeding``)."""

from __future__ import annotations

from typing import ContextManager, Optional

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.utils import get_pg_rank

from megatron_gr.seeding import keyed_init


def global_layer_number(config, layer_number: int, pg_collection: Optional[ProcessGroupCollection], vp_stage) -> int:
    """1-based number of a stage's ``layer_number``-th layer in the whole model."""
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    return layer_number + get_transformer_layer_offset(config, vp_stage, get_pg_rank(pg_collection.pp))


def layer_init_scope(config, layer_number: int, pg_collection, vp_stage, init_seed: Optional[int]) -> ContextManager[None]:
    """The context a layer builds its parameters in: keyed by ``("layer", global number)``;
    a no-op without ``init_seed`` (the global generator, as megatron's own layers draw)."""
    if init_seed is None:
        return keyed_init(None)
    return keyed_init(init_seed, "layer", global_layer_number(config, layer_number, pg_collection, vp_stage))
