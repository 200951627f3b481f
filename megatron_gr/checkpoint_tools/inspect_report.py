"""``megatron-gr checkpoint inspect``: what a checkpoint directory or converted file holds,
as text or JSON: step, layout, config, tensors with shapes and dtypes, dynamic tables with
their row counts."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_gr.checkpoint_tools.content import CheckpointContent
from megatron_gr.checkpoint_tools.single_file import SUFFIXES, read_file
from megatron_gr.checkpoint_tools.source import OPTIMIZER_PREFIX, RNG_PREFIX, SavedCheckpoint, open_checkpoint
from megatron_gr.embeddings.dynamic.checkpoint import read_saved_table

_MODEL_SETTINGS = ("type", "num_layers", "hidden_size", "num_attention_heads", "qk_head_dim", "v_head_dim",
                   "max_seq_len", "enable_hyper_connections")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe(path: str | Path) -> dict:
    """The report as plain values (one CheckpointError line for what is not a checkpoint)."""
    path = Path(path)
    if path.suffix in SUFFIXES and not path.is_dir():
        return _describe_file(path, read_file(path))
    return _describe_directory(open_checkpoint(path))


def _describe_directory(checkpoint: SavedCheckpoint) -> dict:
    state = checkpoint.train_state
    tensors = {key: {"shape": list(info.shape), "dtype": _dtype_name(info.dtype)}
               for key, info in checkpoint.tensors.items() if not key.startswith(OPTIMIZER_PREFIX)}
    optimizer = [key for key in checkpoint.tensors if key.startswith(OPTIMIZER_PREFIX)]
    tables = {}
    for name, manifest in checkpoint.dynamic_tables.items():
        state_rows = read_saved_table(checkpoint.directory, name)["rows"]
        tables[name] = {"rows": int(state_rows["keys"].numel()), "dim": manifest["table"]["dim"],
                        "optimizer": manifest["table"]["optimizer"], "saved_by_ranks": manifest["world_size"],
                        "step": manifest["step"]}
    return {
        "path": str(checkpoint.directory),
        "kind": "best weights" if checkpoint.is_best else ("weights only" if state.get("weights_only") else "training checkpoint"),
        "iteration": checkpoint.iteration,
        "layout": state.get("layout"),
        "distributed_optimizer": state.get("distributed_optimizer"),
        "train_state": {k: v for k, v in state.items() if k not in ("layout", "distributed_optimizer")},
        "verified_files": checkpoint.verified_files,
        "facts": checkpoint.facts,
        "model": _model_settings(checkpoint.config),
        "config": checkpoint.config,
        "tensors": tensors,
        "parameters": sum(info.numel for key, info in checkpoint.tensors.items() if key in tensors),
        "optimizer_tensors": len(optimizer),
        "objects": [key for key in checkpoint.objects if not key.startswith(RNG_PREFIX)],
        "rng_states": sum(key.startswith(RNG_PREFIX) for key in checkpoint.objects),
        "dynamic_tables": tables,
    }


def _describe_file(path: Path, content: CheckpointContent) -> dict:
    tensors = {name: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for name, t in content.weights.items()}
    tables = {name: {"rows": int(entry["state"]["rows"]["keys"].numel()), "dim": entry["description"]["dim"],
                     "optimizer": entry["description"]["optimizer"], "step": entry["state"]["step"],
                     "optimizer_state": "optimizer" in entry["state"]}
              for name, entry in content.dynamic_tables.items()}
    return {
        "path": str(path),
        "kind": "converted file with optimizer state" if content.lossless else "converted file, weights only",
        "iteration": content.iteration,
        "layout": None,
        "train_state": content.common.get("train_state") if content.lossless else None,
        "facts": content.facts,
        "model": _model_settings(content.config),
        "config": content.config,
        "tensors": tensors,
        "parameters": sum(t.numel() for t in content.weights.values()),
        "optimizer_tensors": len(content.optimizer or {}),
        "objects": sorted(content.objects),
        "dynamic_tables": tables,
    }


def _model_settings(config) -> dict:
    model = (config or {}).get("model") or {}
    return {key: model[key] for key in _MODEL_SETTINGS if key in model}


def render(report: dict, *, show_config: bool = False) -> str:
    """The report as text, one fact per line, tensors as an aligned table."""
    lines = [f"{report['path']}: {report['kind']}, step {report['iteration']}"]
    layout = report.get("layout")
    if layout:
        context = layout.get("context_parallel_size", 1)  # absent from checkpoints of before context parallelism
        lines.append(
            "saved under: tensor {tensor_model_parallel_size} x ".format(**layout)
            + (f"context {context} x " if context > 1 else "")
            + "pipeline {pipeline_model_parallel_size} x data {data_parallel_size}".format(**layout)
            + (", distributed optimizer" if report.get("distributed_optimizer") else "")
        )
    if report.get("train_state"):
        lines.append("train state: " + ", ".join(f"{k}={v}" for k, v in report["train_state"].items()))
    if report.get("verified_files") is not None:
        lines.append(f"files: {report['verified_files']} verified against manifest.json")
    elif "verified_files" in report:
        lines.append("files: no manifest.json (saved by an earlier version), not verified")
    if report["model"]:
        lines.append("model: " + ", ".join(f"{k}={v}" for k, v in report["model"].items()))
    if report["facts"]:
        lines.append("facts: " + ", ".join(f"{k}={v}" for k, v in report["facts"].items()))
    lines.append(f"tensors ({len(report['tensors'])}, {report['parameters']:,} values; "
                 f"{report['optimizer_tensors']} optimizer-state tensors not listed):")
    width = max((len(name) for name in report["tensors"]), default=0)
    for name, entry in report["tensors"].items():
        lines.append(f"  {name:<{width}}  {entry['dtype']:<8}  {list(entry['shape'])}")
    if report["dynamic_tables"]:
        lines.append("dynamic tables:")
        for name, entry in report["dynamic_tables"].items():
            lines.append("  " + name + ": " + ", ".join(f"{k}={v}" for k, v in entry.items()))
    if show_config and report.get("config"):
        import yaml

        lines.append("config:")
        lines.extend("  " + line for line in yaml.safe_dump(report["config"], sort_keys=False).splitlines())
    return "\n".join(lines)


def as_json(report: dict) -> str:
    return json.dumps(report, indent=1, default=str)
