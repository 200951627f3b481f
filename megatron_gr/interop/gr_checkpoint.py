"""``megatron-gr checkpoint import-gr`` / ``export-gr``: a generative-recommenders HSTU
retrieval state dict (a torch file) as a megatron_gr checkpoint directory, and back.

The imported checkpoint holds weights only: ``--load`` starts a run from them at step 0,
``megatron-gr evaluate`` evaluates them. What their layout has that ours has not (see
``gr_hstu``) is kept in the checkpoint under ``interop/generative_recommenders.pt``, so an
import followed by an export gives back the same state dict.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import torch

from megatron_gr.checkpoint_tools.content import CheckpointContent, content_of
from megatron_gr.checkpoint_tools.source import offline_process_group, open_checkpoint
from megatron_gr.checkpoint_tools.writer import check_new_output, write_checkpoint
from megatron_gr.config.errors import ConfigError
from megatron_gr.interop.gr_hstu import HSTUShape, check_model_settings, from_gr, to_gr
from megatron_gr.training.checkpoint_errors import CheckpointError

EXTRAS = "interop/generative_recommenders.pt"
_LINEARS = ("uvqk_proj", "output_proj")  # megatron linears: one _extra_state object per layer
_CONTAINERS = ("state_dict", "model_state_dict", "model")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path} cannot be read as a torch file ({type(error).__name__})") from None
    for key in _CONTAINERS:  # their training loop saves {"model_state_dict": ..., "optimizer_state_dict": ...}
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return raw


def import_gr_checkpoint(source: str | Path, *, config_path: str | Path, out: str | Path) -> str:
    """Their state dict in ``source`` -> the checkpoint directory ``out`` for the model
    ``config_path`` describes; returns a line saying what was written."""
    from megatron_gr.config import resolve_config

    source, out = Path(source), Path(out)
    check_new_output(out)
    config = resolve_config(str(config_path), [])
    raw = config.to_dict()
    if raw["model"]["type"] != "retrieval" or config.embeddings["item"].type != "plain":
        raise ConfigError("import-gr builds an HSTU retrieval model with a plain item table: set model.type=retrieval and embeddings.item.type=plain")
    check_model_settings(raw["model"])
    shape = HSTUShape.of(config.model)
    weights, extras = from_gr(_read_state_dict(source), shape)
    rows = weights["item_table.weight"].shape[0]
    layers = shape.num_layers
    stacked = {f"decoder.layers.{name.split('.', 3)[3]}": layers for name in weights if name.startswith("decoder.layers.0.")}
    objects = {f"decoder.layers.{layer}.{linear}._extra_state": None for layer in range(layers) for linear in _LINEARS}
    object_keys = {name: f"decoder.layers.{name.split('.', 3)[3]}/shard_{name.split('.')[2]}_{layers}" for name in objects}
    content = CheckpointContent(
        iteration=0,
        config=raw,
        facts={"model_type": "HSTURetrievalModel", "item_table": "plain", "num_items": rows - 1, "item_table_rows": rows},
        weights=weights,
        stacked=stacked,
        objects=objects,
        object_keys=object_keys,
    )
    buffer = io.BytesIO()
    torch.save(extras, buffer)
    written = write_checkpoint(content, out, where=str(source), extra_files={EXTRAS: buffer.getvalue()})
    return f"wrote {written}: {layers} HSTU layers, {rows - 1} items (weights only: a run starts from them at step 0)"


def _saved_config(checkpoint) -> dict:
    """The checkpoint's config, complete (settings added since it was saved have their
    defaults, as when a run loads it)."""
    from megatron_gr.config import ExperimentConfig

    if checkpoint.config is None:
        raise CheckpointError(f"{checkpoint.directory} has no config.yaml: its model cannot be mapped to the generative-recommenders layout")
    try:
        return ExperimentConfig.from_dict(copy.deepcopy(checkpoint.config)).to_dict()
    except ConfigError as error:
        raise CheckpointError(f"{checkpoint.directory}: its saved config is not valid for this megatron_gr ({error})") from None


def export_gr_checkpoint(source: str | Path, *, out: str | Path) -> str:
    """The checkpoint ``source`` means -> their state dict in the new torch file ``out``."""
    out = Path(out)
    if out.suffix != ".pt":
        raise CheckpointError(f"--out {out}: export-gr writes a torch file (.pt)")
    check_new_output(out)
    checkpoint = open_checkpoint(source)
    saved = _saved_config(checkpoint)
    model = saved["model"]
    if model["type"] != "retrieval" or saved["embeddings"]["item"]["type"] != "plain":
        raise CheckpointError(f"{checkpoint.directory} is not an HSTU retrieval model with a plain item table: it has no generative-recommenders layout")
    check_model_settings(model)
    with offline_process_group():
        content = content_of(checkpoint, with_optimizer=False)
    extras_path = checkpoint.directory / EXTRAS
    extras = torch.load(extras_path, map_location="cpu", weights_only=True) if extras_path.is_file() else {}
    theirs = to_gr(content.weights, HSTUShape.of(model), extras)
    tmp = out.parent / f".tmp-{out.name}"
    try:
        torch.save(theirs, tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return f"wrote {out}: the generative-recommenders HSTU state dict of step {checkpoint.iteration} ({len(theirs)} tensors)"
