"""What a checkpoint holds, as plain tensors independent of any parallel layout: the model's
weights under a single-rank model's ``state_dict`` names, the rows of its dynamic tables,
and (for a lossless copy) the optimizer state and megatron's common state.

RNG states are never carried: they belong to the layout and the processes that saved them,
and a run that loads a converted checkpoint draws its random streams from the seed, as a run
does that loads a checkpoint under another layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from megatron_gr.checkpoint_tools.layer_keys import is_stacked, layer_name, object_layer_name
from megatron_gr.checkpoint_tools.source import SavedCheckpoint, read_entries
from megatron_gr.embeddings.dynamic.checkpoint import read_saved_table
from megatron_gr.training.checkpoint_errors import CheckpointError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class CheckpointContent:
    iteration: int
    """The training step that saved the weights."""
    config: Optional[dict]
    """The saved config (plain values)."""
    facts: dict
    """The manifest's model facts (model class, item count)."""
    weights: dict[str, torch.Tensor]
    """Model tensors by single-rank state-dict name (``decoder.layers.0.uvqk_proj.weight``)."""
    stacked: dict[str, int] = field(default_factory=dict)
    """Checkpoint keys saved as one tensor per layer stack -> number of layers."""
    objects: dict[str, Any] = field(default_factory=dict)
    """Per-layer objects (linear layers' ``_extra_state``) by state-dict name."""
    object_keys: dict[str, str] = field(default_factory=dict)
    """State-dict name of each object -> its checkpoint key (``name/shard_<i>_<layers>``)."""
    optimizer: Optional[dict[str, torch.Tensor]] = None
    """Optimizer state tensors by checkpoint key (lossless copies only)."""
    common: Optional[dict] = None
    """megatron's common state: train state, schedule, optimizer settings (lossless only)."""
    dynamic_tables: dict[str, dict] = field(default_factory=dict)
    """``{table: {"description": {...}, "state": {"step", "rows", "optimizer"?, "admission"?}}}``."""

    @property
    def lossless(self) -> bool:
        return self.common is not None


def cast_floating(tensors: dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """Floating-point tensors in ``dtype`` (others as they are); None keeps every dtype."""
    if dtype is None:
        return tensors
    return {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}


def content_of(checkpoint: SavedCheckpoint, *, with_optimizer: bool, dtype: Optional[torch.dtype] = None) -> CheckpointContent:
    """Reads ``checkpoint`` into plain tensors (inside ``offline_process_group``).

    Args:
        with_optimizer: also the optimizer state, the schedule and the train state, so the
            copy resumes training where the checkpoint would (``best/`` has none).
        dtype: the weights' (and dynamic rows') dtype; None keeps the saved one. Optimizer
            state keeps its own (fp32).
    """
    if with_optimizer and checkpoint.is_best:
        raise CheckpointError(f"{checkpoint.directory} holds the best weights only (no optimizer state): convert it without --with-optimizer")
    model_keys, object_keys = checkpoint.model_keys(), checkpoint.model_objects()
    optimizer_keys = [key for key in checkpoint.tensors if key not in model_keys] if with_optimizer else []
    entries = read_entries(checkpoint, model_keys + object_keys + optimizer_keys)
    weights, stacked = {}, {}
    for key in model_keys:
        tensor = entries[key]
        if is_stacked(key):
            stacked[key] = tensor.shape[0]
            for layer in range(tensor.shape[0]):
                weights[layer_name(key, layer)] = tensor[layer].clone()
        else:
            weights[key] = tensor
    objects, names = {}, {}
    for key in object_keys:
        name = object_layer_name(key)
        if name is None:
            raise CheckpointError(f"{checkpoint.directory}: object {key!r} is not a per-layer object; this version cannot convert it")
        objects[name], names[name] = entries[key], key
    tables = {}
    for name, manifest in checkpoint.dynamic_tables.items():
        state = read_saved_table(checkpoint.directory, name)
        if not with_optimizer:
            state.pop("optimizer", None)
        if dtype is not None:
            state["rows"]["weights"] = state["rows"]["weights"].to(dtype)
        tables[name] = {"description": manifest["table"], "state": state}
    return CheckpointContent(
        iteration=int(checkpoint.iteration or 0),
        config=checkpoint.config,
        facts=dict(checkpoint.facts),
        weights=cast_floating(weights, dtype),
        stacked=stacked,
        objects=objects,
        object_keys=names,
        optimizer={key: entries[key] for key in optimizer_keys} if with_optimizer else None,
        common=checkpoint.common if with_optimizer else None,
        dynamic_tables=tables,
    )


def stacked_weights(content: CheckpointContent) -> dict[str, torch.Tensor]:
    """The model tensors by checkpoint key: per-layer weights stacked back."""
    out = {}
    used = set()
    for key, layers in content.stacked.items():
        names = [layer_name(key, layer) for layer in range(layers)]
        missing = [name for name in names if name not in content.weights]
        if missing:
            raise CheckpointError(f"the weights lack {missing[0]} (one of the {layers} layers of {key})")
        out[key] = torch.stack([content.weights[name] for name in names])
        used.update(names)
    for name, tensor in content.weights.items():
        if name not in used:
            out[name] = tensor
    return out
