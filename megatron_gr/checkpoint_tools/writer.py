"""A :class:`CheckpointContent` written as a megatron_gr checkpoint directory that ``--load``,
``megatron-gr evaluate`` and the checkpoint tools read: megatron's ``dist_checkpointing``
files (saved by one process: the tensors at full shape, which every layout loads its
slices of), the dynamic tables' files, ``config.yaml``, ``manifest.json`` and the tracker.

    OUT/
      iter_<step>/   the checkpoint (step 0 for weights only, see below)
      latest_checkpointed_iteration.txt
      config.yaml

A lossless content (optimizer state and megatron's common state) resumes training at its
step, as the checkpoint it was read from would; the RNG states are not carried (its train
state says ``fresh_rng``), so the random streams start from the seed. Weights alone make a
starting point: ``--load`` gives a run those weights at step 0 with a fresh optimizer and
schedule (fine-tuning), and ``evaluate`` evaluates them.

Everything is written into a hidden sibling of OUT that is renamed at the end: a failure
leaves nothing at OUT.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import yaml

from megatron_gr.checkpoint_tools.content import CheckpointContent, cast_floating, stacked_weights
from megatron_gr.checkpoint_tools.layer_keys import object_key
from megatron_gr.checkpoint_tools.source import offline_process_group
from megatron_gr.config.errors import ConfigError
from megatron_gr.embeddings.dynamic.checkpoint import write_saved_table
from megatron_gr.training.checkpoint_errors import CheckpointError
from megatron_gr.training.checkpoint_integrity import write_manifest
from megatron_gr.training.checkpoint_layout import CONFIG, iteration_dir, write_tracker

WEIGHTS_ONLY_STEP = 0


def check_new_output(out: Path) -> None:
    """``--out`` must not exist (nothing is ever overwritten) and its parent must."""
    if out.exists():
        raise CheckpointError(f"--out {out} already exists: choose a new path (nothing is overwritten)")
    if not out.parent.is_dir():
        raise CheckpointError(f"--out {out}: its directory {out.parent} does not exist")


def check_config(content: CheckpointContent, where: str):
    """The content's config as an ExperimentConfig (a checkpoint without one cannot be
    loaded by --load: the loader compares it with the run's)."""
    from megatron_gr.config import ExperimentConfig

    if content.config is None:
        raise CheckpointError(f"{where} holds no config (its checkpoint had no config.yaml): it cannot be written as a loadable checkpoint")
    try:
        return ExperimentConfig.from_dict(copy.deepcopy(content.config))
    except ConfigError as error:
        raise CheckpointError(f"{where}: its saved config is not valid for this megatron_gr ({error})") from None


def _train_state(content: CheckpointContent, distributed_optimizer: bool) -> dict:
    if content.lossless:
        return {**content.common["train_state"], "fresh_rng": True}
    return {
        "iteration": WEIGHTS_ONLY_STEP, "consumed_samples": 0, "best_metric": None, "best_iteration": None,
        "evals_since_best": 0,
        "layout": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "data_parallel_size": 1,
                   "context_parallel_size": 1},
        "distributed_optimizer": distributed_optimizer, "weights_only": True, "source_iteration": content.iteration,
        "fresh_rng": True,
    }


def _sharded_state(content: CheckpointContent, dtype: Optional[torch.dtype], distributed_optimizer: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    model = {
        key: ShardedTensor.from_rank_offsets(key, tensor.contiguous(), replica_id=0)
        for key, tensor in cast_floating(stacked_weights(content), dtype).items()
    }
    for name, value in content.objects.items():
        key, offset, shape = object_key(content.object_keys[name])
        model[content.object_keys[name]] = ShardedObject(key, value, shape, offset, replica_id=0)
    state = copy.deepcopy(content.common) if content.lossless else {}
    state["model"] = model
    state["train_state"] = _train_state(content, distributed_optimizer)
    if content.optimizer is not None:
        # Placed apart: megatron keeps only the non-tensor part of the tree in common.pt,
        # so the optimizer's common state stays exactly as it was saved.
        state["optimizer_tensors"] = {
            key: ShardedTensor.from_rank_offsets(key, tensor.contiguous(), replica_id=0) for key, tensor in content.optimizer.items()
        }
    return state


def write_checkpoint(content: CheckpointContent, out: str | Path, *, dtype: Optional[torch.dtype] = None, where: str = "the file",
                     extra_files: Optional[dict[str, bytes]] = None) -> Path:
    """Writes ``content`` as the checkpoint directory ``out`` (which must not exist);
    returns the checkpoint's ``iter_*`` directory. ``dtype`` casts the model weights;
    ``extra_files`` (relative path: bytes) are written into the checkpoint too (listed in
    its manifest)."""
    from megatron.core import dist_checkpointing

    from megatron_gr.compat import checkpoint_writes_without_manager_process

    out = Path(out)
    check_new_output(out)
    config = check_config(content, where)
    step = content.iteration if content.lossless else WEIGHTS_ONLY_STEP
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        directory = iteration_dir(tmp, step)
        directory.mkdir(parents=True)
        with offline_process_group():
            checkpoint_writes_without_manager_process()
            dist_checkpointing.save(_sharded_state(content, dtype, config.parallel.use_distributed_optimizer), str(directory))
            for name, entry in content.dynamic_tables.items():
                state = copy.copy(entry["state"])
                state["rows"] = {**state["rows"], "weights": state["rows"]["weights"].float()}  # tables store fp32
                write_saved_table(directory, name, description=entry["description"], state=state)
            config_text = yaml.safe_dump(content.config, sort_keys=False)
            (directory / CONFIG).write_text(config_text)
            (tmp / CONFIG).write_text(config_text)
            for name, data in (extra_files or {}).items():
                (directory / name).parent.mkdir(parents=True, exist_ok=True)
                (directory / name).write_bytes(data)
            write_manifest(directory, facts=content.facts)
        write_tracker(tmp, step)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return iteration_dir(out, step)
