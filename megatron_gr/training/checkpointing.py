"""Checkpoints with megatron ``dist_checkpointing``: model, optimizer, LR schedule, RNG and
training state (step, data position, early-stopping record). A checkpoint saved under any
(tensor, pipeline, data-parallel) layout loads under any other; RNG states are restored
only under the layout that saved them.

Layout under the save directory::

    iter_0000100/                       one complete checkpoint per saved step
      dynamic_embeddings/               rows of dynamic tables, per saving rank (any number
                                        of ranks loads them: see embeddings/dynamic)
    best/                               model weights of the best validation metric
    latest_checkpointed_iteration.txt   the step ``--load`` resumes from

A checkpoint is written into a hidden temporary directory and renamed into place only
after every rank finished; the tracker file is replaced atomically after that. A killed
save leaves at most a ``.tmp-*`` directory that loading never looks at.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_gr.compat import (
    allocate_distributed_optimizer_state,
    keep_adam_step_on_reshardable_load,
    load_distributed_checkpoint,
    reshardable_state_in_buffer_coordinates,
    use_fused_adam,
)
from megatron_gr.embeddings.dynamic import collections_of, load_collection, save_collection

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded (the message says which file and why)."""


BEST = "best"
# The distributed optimizer's state in model space (each state tensor shaped like its
# parameter, gathered over data-parallel ranks on save), so a checkpoint reshards across
# tensor, pipeline and data-parallel sizes. Other optimizers ignore it.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path) -> Optional[int]:
    """The step recorded in the tracker file, or None when ``root`` holds no checkpoint."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{tracker} is corrupt: expected a step number, found {text!r}") from None


def _layout() -> dict[str, int]:
    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
    }


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_sharded_object() -> ShardedObject:
    """Every rank's RNG state (they differ across tensor-parallel ranks and stages)."""
    layout = _layout()
    shape = (layout["pipeline_model_parallel_size"], layout["tensor_model_parallel_size"], layout["data_parallel_size"])
    offset = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", _rng_state(), shape, offset, replica_id=0)


def _model(model_chunks) -> torch.nn.Module:
    """The bare model under the bf16 and DDP wrappers: checkpoint keys do not depend on
    precision or wrapping, so a bf16 GPU checkpoint loads into an fp32 CPU model."""
    from megatron_gr.training.model_setup import unwrap

    return unwrap(model_chunks[0])


def _distributed_optimizer(model_chunks) -> bool:
    return model_chunks[0].ddp_config.use_distributed_optimizer


def _model_state(model_chunks) -> dict:
    return _model(model_chunks).sharded_state_dict()


def _write_atomically(state: dict, final: Path, model_chunks, *, with_optimizer: bool) -> None:
    """dist_checkpointing (and the dynamic tables' own files) into a temporary sibling,
    then rename over ``final``."""
    tmp = final.parent / f".tmp-{final.name}"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(state, str(tmp))
    if parallel_state.get_tensor_model_parallel_rank() == 0:  # tensor-parallel ranks hold copies
        for collection in collections_of(_model(model_chunks)):
            save_collection(collection, tmp, with_optimizer=with_optimizer)
    dist.barrier()
    if dist.get_rank() == 0:
        old = final.parent / f".old-{final.name}"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def save_checkpoint(root: str | Path, iteration: int, model_chunks, optimizer, scheduler, train_state: dict) -> Path:
    root = Path(root)
    model_state = _model_state(model_chunks)
    reshardable_state_in_buffer_coordinates()
    state = {
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, metadata=OPTIMIZER_METADATA),
        "scheduler": scheduler.state_dict(),
        "train_state": {
            **train_state,
            "iteration": iteration,
            "layout": _layout(),
            "distributed_optimizer": _distributed_optimizer(model_chunks),
        },
        "rng_state": _rng_sharded_object(),
    }
    final = iteration_dir(root, iteration)
    _write_atomically(state, final, model_chunks, with_optimizer=True)
    if dist.get_rank() == 0:
        tracker_tmp = root / f".{TRACKER}.tmp"
        tracker_tmp.write_text(f"{iteration}\n")
        os.replace(tracker_tmp, root / TRACKER)
    dist.barrier()
    return final


def load_checkpoint(root: str | Path, model_chunks, optimizer, scheduler) -> Optional[dict]:
    """Restores the latest checkpoint under ``root``; returns its train state (None when
    there is none). RNG states are restored only under the layout that saved them."""
    iteration = latest_iteration(root)
    if iteration is None:
        return None
    directory = iteration_dir(root, iteration)
    if not directory.is_dir():
        raise CheckpointError(f"{Path(root) / TRACKER} names step {iteration} but {directory} does not exist")
    common = dist_checkpointing.load_common_state_dict(str(directory))
    saved_with = common["train_state"].get("distributed_optimizer", False)
    if saved_with != _distributed_optimizer(model_chunks):
        raise CheckpointError(
            f"{directory} holds the state of {'the distributed' if saved_with else 'a non-distributed'} "
            "optimizer, which this run cannot read: set "
            f"parallel.use_distributed_optimizer={str(saved_with).lower()} to load it"
        )
    model_state = _model_state(model_chunks)
    allocate_distributed_optimizer_state(optimizer)
    keep_adam_step_on_reshardable_load()
    reshardable_state_in_buffer_coordinates()
    template = {
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, is_loading=True, metadata=OPTIMIZER_METADATA),
    }
    same_layout = common["train_state"]["layout"] == _layout()
    if same_layout:
        template["rng_state"] = _rng_sharded_object()
    loaded = load_distributed_checkpoint(template, str(directory))
    _model(model_chunks).load_state_dict(loaded["model"])
    _load_dynamic_tables(model_chunks, directory)
    optimizer.load_state_dict(loaded["optimizer"])
    use_fused_adam(optimizer)  # the loaded param groups bring the saving run's fused setting
    scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    return loaded["train_state"]


def save_best(root: str | Path, model_chunks, record: dict) -> None:
    """Model weights only, replacing the previous best atomically."""
    state = {"model": _model_state(model_chunks), "best": record}
    _write_atomically(state, Path(root) / BEST, model_chunks, with_optimizer=False)


def load_best(root: str | Path, model_chunks) -> Optional[dict]:
    directory = Path(root) / BEST
    if not directory.is_dir():
        return None
    loaded = load_distributed_checkpoint({"model": _model_state(model_chunks)}, str(directory))
    _model(model_chunks).load_state_dict(loaded["model"])
    _load_dynamic_tables(model_chunks, directory)
    return loaded["best"]


def _load_dynamic_tables(model_chunks, directory: Path) -> None:
    """Dynamic tables (their rows are not in the dist checkpoint) from their own files,
    re-routed to this run's ranks."""
    for collection in collections_of(_model(model_chunks)):
        load_collection(collection, directory)
