"""ULTRA-HSTU's mixture of transducers (``model.transducers``): one STU stack per behaviour
channel, each with its own depth, width, semi-local attention and attention truncation::

    model:
      type: ranking
      transducers:
        - {name: imp, num_layers: 2, hidden_size: 64, sla_k1: 256, sla_k2: 32,
           attn_truncation_split_layer: 1, attn_truncation_tail_len: 128}
        - {name: click, num_layers: 2, hidden_size: 32}

A channel named ``x`` reads the feature groups ``x``, ``x_action``, ``x_watchtime`` and
``x_timestamp`` of ``ranking.features`` (as ``uih`` and its companions); candidates and
contextual features are shared. One channel without a name reads the ``uih`` groups and is
DLRM-HSTU. Unset fields follow the ``model`` section. The checks here need only the list;
those that need the feature groups live in ``ultra_checks.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from megatron_gr.config.errors import ConfigError
from megatron_gr.config.validation import check_int_range, require

CHANNEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_NAMES = ("uih", "candidate", "contextual")
RESERVED_SUFFIXES = ("_action", "_watchtime", "_timestamp")
# Group suffixes of a channel: its history features, then its companions.
CHANNEL_GROUP_SUFFIXES = ("", "_action", "_watchtime", "_timestamp")


@dataclass
class TransducerConfig:
    """One channel: an STU stack over one behaviour's history (None: as in ``model``)."""

    name: str = ""
    """The channel's name, the prefix of its feature groups; empty only for a single channel
    (which reads the ``uih`` groups)."""

    num_layers: Optional[int] = None
    """STU layers of the channel."""

    hidden_size: Optional[int] = None
    """Width of the channel's tokens; the tower reads the channels' candidate outputs
    concatenated (widths may differ)."""

    num_attention_heads: Optional[int] = None
    """Heads of the channel's layers."""

    qk_head_dim: Optional[int] = None
    """Per-head width of queries and keys."""

    v_head_dim: Optional[int] = None
    """Per-head width of values and of the gate U."""

    sla_k1: Optional[int] = None
    """Semi-local attention window K1 of the channel (0: off)."""

    sla_k2: Optional[int] = None
    """Semi-local attention global prefix K2 of the channel."""

    attn_truncation_split_layer: Optional[int] = None
    """Layers that see the whole history; later ones see only the last
    ``attn_truncation_tail_len`` history events (0: no truncation)."""

    attn_truncation_tail_len: Optional[int] = None
    """History events kept after the split layer (contextual tokens and candidates always
    stay)."""

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "qk_head_dim", "v_head_dim"):
            if getattr(self, name) is not None:
                check_int_range(name, getattr(self, name), low=1)
        for name in ("sla_k1", "sla_k2", "attn_truncation_split_layer", "attn_truncation_tail_len"):
            if getattr(self, name) is not None:
                check_int_range(name, getattr(self, name), low=0)

    def overrides(self) -> dict:
        """The model fields this channel sets."""
        names = ("num_layers", "hidden_size", "num_attention_heads", "qk_head_dim", "v_head_dim", "sla_k1", "sla_k2",
                 "attn_truncation_split_layer", "attn_truncation_tail_len")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def validate_transducers(transducers: Optional[list[TransducerConfig]]) -> None:
    """The rules on the channel list alone, each one line naming ``transducers``."""
    if transducers is None:
        return
    require(len(transducers) > 0, "model.transducers=[] has no channel: give at least one (one unnamed channel [{}] is DLRM-HSTU)")
    names = [t.name for t in transducers]
    if len(transducers) == 1 and names[0] == "":
        return
    for i, name in enumerate(names):
        require(
            name != "",
            f"model.transducers[{i}].name is empty: with {len(transducers)} channels every channel needs a name "
            "(the prefix of its feature groups)",
        )
        require(
            CHANNEL_NAME.match(name) is not None,
            f"model.transducers[{i}].name={name!r} is not a valid channel name: use letters, digits and '_', "
            "not starting with a digit",
        )
        require(
            name not in RESERVED_NAMES,
            f"model.transducers[{i}].name={name!r} is reserved ({', '.join(RESERVED_NAMES)} name other feature "
            "groups): choose another name",
        )
        for suffix in RESERVED_SUFFIXES:
            require(
                not name.endswith(suffix),
                f"model.transducers[{i}].name={name!r} ends in {suffix!r}, which names a channel's companion group: "
                "choose a name without it",
            )
        require(names.count(name) == 1, f"model.transducers name channel {name!r} twice: channel names must be unique")


def validate_truncation(split_layer: int, tail_len: int, num_layers: int, where: str) -> None:
    """``where``: the fields' prefix (``model.`` or ``model.transducers[i].``)."""
    check_int_range(f"{where}attn_truncation_split_layer", split_layer, low=0)
    check_int_range(f"{where}attn_truncation_tail_len", tail_len, low=0)
    if split_layer == 0:
        require(
            tail_len == 0,
            f"{where}attn_truncation_tail_len={tail_len} has no effect without {where}attn_truncation_split_layer: "
            "set the split layer (layers that see the whole history) or the tail to 0",
        )
        return
    if split_layer >= num_layers:
        raise ConfigError(
            f"{where}attn_truncation_split_layer={split_layer} must be smaller than the channel's "
            f"num_layers={num_layers}: layers after it see the truncated history; use 1..{num_layers - 1} or 0 (off)"
        )
    require(
        tail_len >= 1,
        f"{where}attn_truncation_tail_len={tail_len}: truncation after layer {split_layer} needs the history events "
        "to keep (>= 1)",
    )


def channel_group_names(name: str) -> tuple[str, ...]:
    """The feature groups of channel ``name`` (``uih``'s for the unnamed channel)."""
    prefix = name or "uih"
    return tuple(prefix + suffix for suffix in CHANNEL_GROUP_SUFFIXES)
