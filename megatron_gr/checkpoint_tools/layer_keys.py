"""Checkpoint keys <-> the names of a single-rank model's ``state_dict``.

megatron's ``TransformerBlock`` saves its layers stacked: the checkpoint holds one tensor
``decoder.layers.uvqk_proj.weight`` of shape ``[num_layers, 64, 16]`` whose row i is layer
i's ``decoder.layers.<i>.uvqk_proj.weight`` (global layer numbers, so the same under every
pipeline layout), and one object ``decoder.layers.uvqk_proj._extra_state`` per layer
(saved as ``.../shard_<i>_<num_layers>``). Every other tensor is saved under its own name.

A key is stacked when ``layers.`` is followed by a name, not a layer number (modules that
number their own layers, e.g. an MLP's ``layers.0.weight``, are saved as they are); the keys
that were stacked are recorded so the reverse mapping never guesses.
"""

from __future__ import annotations

import re
from typing import Optional

_STACKED = re.compile(r"^(?P<head>(?:.*\.)?layers\.)(?P<tail>(?!\d+\.)[^/]+)$")
_OBJECT = re.compile(r"^(?P<key>[^/]+)/shard_(?P<offset>[\d.]+)_(?P<shape>[\d.]+)$")


def is_stacked(key: str) -> bool:
    """Whether checkpoint tensor ``key`` holds one row per layer of a megatron block."""
    return _STACKED.match(key) is not None


def layer_name(key: str, layer: int) -> str:
    """The state-dict name of layer ``layer``'s slice of stacked key ``key``."""
    match = _STACKED.match(key)
    if match is None:
        raise ValueError(f"{key!r} is not a stacked layer key")
    return f"{match['head']}{layer}.{match['tail']}"


def object_key(dcp_key: str) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """``name/shard_<offset>_<shape>`` (how megatron stores a sharded object) -> (name,
    offset, shape)."""
    match = _OBJECT.match(dcp_key)
    if match is None:
        raise ValueError(f"{dcp_key!r} is not a sharded-object key")
    offset = tuple(int(x) for x in match["offset"].split("."))
    shape = tuple(int(x) for x in match["shape"].split("."))
    return match["key"], offset, shape


def object_layer_name(dcp_key: str) -> Optional[str]:
    """The state-dict name of a per-layer object (``...layers.X._extra_state/shard_i_L`` ->
    ``...layers.i.X._extra_state``); None for other objects (e.g. RNG states)."""
    key, offset, shape = object_key(dcp_key)
    if not is_stacked(key) or len(offset) != 1:
        return None
    return layer_name(key, offset[0])
