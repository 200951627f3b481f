"""Checkpoints with megatron ``dist_checkpointing``: model, optimizer, LR schedule, RNG and
training state (step, data position, early-stopping record). A checkpoint saved under any
(tensor, context, pipeline, data-parallel) layout loads under any other; RNG states are
restored only under the layout that saved them. The directory layout: ``checkpoint_layout``.

A checkpoint is written into a hidden temporary directory with the run's ``config.yaml``
and a ``manifest.json`` of checksums (``checkpoint_integrity``), and renamed into place only
after every rank finished; the tracker file is replaced atomically after that. A killed
save leaves at most a ``.tmp-*`` directory that loading never looks at.

Loading checks before megatron reads a tensor: every file against the manifest (a damaged
one is named, with the previous complete checkpoint to fall back to), then the saved model
settings against this run's (``checkpoint_compare``); megatron's load then runs strictly
(a tensor of the checkpoint the model lacks, or the reverse, is an error, not a partial
load). Every failure is one ``CheckpointError`` line.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException

from megatron_gr.compat import (
    allocate_distributed_optimizer_state,
    checkpoint_writes_without_manager_process,
    keep_adam_step_on_reshardable_load,
    load_distributed_checkpoint,
    reshardable_state_in_buffer_coordinates,
    use_fused_adam,
)
from megatron_gr.config.experiment import ExperimentConfig
from megatron_gr.embeddings.dynamic import collections_of, load_collection, save_collection
from megatron_gr.training.checkpoint_compare import check_same_model, model_facts, read_saved_config
from megatron_gr.training.checkpoint_errors import CheckpointError
from megatron_gr.training.checkpoint_integrity import read_manifest, verify, write_manifest
from megatron_gr.training.checkpoint_layout import (
    BEST,
    CONFIG,
    MANIFEST,
    TRACKER,
    iteration_dir,
    previous_hint,
    read_tracker,
    resolve_load,
    write_tracker,
)
from megatron_gr.training.schedule_resume import restore_schedule

__all__ = [
    "BEST", "TRACKER", "CheckpointError", "iteration_dir", "latest_iteration", "load_best", "load_checkpoint",
    "save_best", "save_checkpoint",
]

# The distributed optimizer's state in model space (each state tensor shaped like its
# parameter, gathered over data-parallel ranks on save), so a checkpoint reshards across
# tensor, pipeline and data-parallel sizes. Other optimizers ignore it.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
# Saved for one layout only: left in the checkpoint when another layout loads it.
_LAYOUT_BOUND = ("rng_state",)
# Left in the checkpoint by a weights-only load.
_TRAINING_STATE = ("optimizer.", "rng_state")


def latest_iteration(root: str | Path) -> Optional[int]:
    """The step recorded in the tracker file, or None when ``root`` has none."""
    return read_tracker(root)


def _layout() -> dict[str, int]:
    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
        "context_parallel_size": parallel_state.get_context_parallel_world_size(),
    }


def _same_layout(saved: dict) -> bool:
    """Checkpoints from before context parallelism have no context-parallel size: 1."""
    return {"context_parallel_size": 1, **saved} == _layout()


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
    """Every rank's RNG state (they differ across tensor-parallel ranks and stages); the last
    axis counts data- and context-parallel ranks together."""
    layout = _layout()
    shape = (
        layout["pipeline_model_parallel_size"],
        layout["tensor_model_parallel_size"],
        layout["data_parallel_size"] * layout["context_parallel_size"],
    )
    offset = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(with_context_parallel=True),
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


# ------------------------------------------------------------------------ save
def _write_atomically(state: dict, final: Path, model_chunks, config: ExperimentConfig, *, with_optimizer: bool) -> None:
    """dist_checkpointing (and the dynamic tables' own files), the config and the manifest
    into a temporary sibling, then rename over ``final``."""
    tmp = final.parent / f".tmp-{final.name}"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    checkpoint_writes_without_manager_process()
    dist_checkpointing.save(state, str(tmp))
    if parallel_state.get_tensor_model_parallel_rank() == 0:  # tensor-parallel ranks hold copies
        for collection in collections_of(_model(model_chunks)):
            save_collection(collection, tmp, with_optimizer=with_optimizer)
    if dist.get_rank() == 0:
        (tmp / CONFIG).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    dist.barrier()
    write_manifest(tmp, facts=model_facts(_model(model_chunks), config))
    dist.barrier()
    if dist.get_rank() == 0:
        old = final.parent / f".old-{final.name}"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def save_checkpoint(
    root: str | Path, iteration: int, model_chunks, optimizer, scheduler, train_state: dict, *, config: ExperimentConfig
) -> Path:
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
    _write_atomically(state, final, model_chunks, config, with_optimizer=True)
    if dist.get_rank() == 0:
        write_tracker(root, iteration)
    dist.barrier()
    return final


def save_best(root: str | Path, model_chunks, record: dict, *, config: ExperimentConfig) -> None:
    """Model weights only, replacing the previous best atomically."""
    state = {"model": _model_state(model_chunks), "best": record}
    _write_atomically(state, Path(root) / BEST, model_chunks, config, with_optimizer=False)


# ------------------------------------------------------------------------ load
def load_checkpoint(
    root: str | Path, model_chunks, optimizer, scheduler, *, config: ExperimentConfig, log: Callable[[str], None],
    weights_only: bool = False,
) -> Optional[dict]:
    """Restores the checkpoint ``root`` (and ``checkpoint.ckpt_step``) names; returns its
    train state, or None (after logging why) when there is nothing to resume from. RNG
    states are restored only under the layout that saved them; the LR schedule follows
    ``schedule_resume``. ``weights_only``: the model alone (for evaluation; the optimizer
    and scheduler are not touched), as for a checkpoint that holds weights only (written by
    ``megatron-gr checkpoint convert``: a run starts from them at step 0)."""
    root = Path(root)
    target = resolve_load(root, step=config.checkpoint.ckpt_step)
    if target.directory is None:
        log(target.notice)
        return None
    directory = target.directory
    hint = previous_hint(root, before=target.iteration)
    common = _checked_common_state(directory, root, model_chunks, config, hint=hint, log=log)
    saved_state = common.get("train_state", {})
    if saved_state.get("weights_only") and not weights_only:  # written by `megatron-gr checkpoint`
        log(
            f"{directory} holds weights only (of step {saved_state.get('source_iteration')}): training starts "
            "from them at step 0 with a fresh optimizer and learning-rate schedule"
        )
        weights_only = True
    if weights_only:
        loaded = _strict_load({"model": _model_state(model_chunks)}, directory, hint=hint, may_remain=_TRAINING_STATE)
        _model(model_chunks).load_state_dict(loaded["model"])
        _load_dynamic_tables(model_chunks, directory, hint=hint)
        return common["train_state"]
    saved_with = common.get("train_state", {}).get("distributed_optimizer", False)
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
    # A checkpoint rewritten by a tool carries no RNG states of its own (``fresh_rng``).
    train_state = common["train_state"]
    same_layout = _same_layout(train_state["layout"]) and not train_state.get("fresh_rng")
    if same_layout:
        template["rng_state"] = _rng_sharded_object()
    loaded = _strict_load(template, directory, hint=hint, may_remain=_LAYOUT_BOUND)
    _model(model_chunks).load_state_dict(loaded["model"])
    _load_dynamic_tables(model_chunks, directory, hint=hint)
    optimizer.load_state_dict(loaded["optimizer"])
    use_fused_adam(optimizer)  # the loaded param groups bring the saving run's fused setting
    notice = restore_schedule(
        scheduler,
        loaded["scheduler"],
        override=config.checkpoint.override_opt_param_scheduler,
        use_checkpoint=config.checkpoint.use_checkpoint_opt_param_scheduler,
    )
    if notice:
        log(notice)
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    return loaded["train_state"]


def load_best(root: str | Path, model_chunks, *, config: ExperimentConfig, log: Callable[[str], None]) -> Optional[dict]:
    """The best weights under ``root`` into the model; their record, or None without
    ``best/``."""
    root = Path(root)
    directory = root / BEST
    if not directory.is_dir():
        return None
    _checked_common_state(directory, root, model_chunks, config, hint="", log=log)
    loaded = _strict_load({"model": _model_state(model_chunks)}, directory, hint="", may_remain=())
    _model(model_chunks).load_state_dict(loaded["model"])
    _load_dynamic_tables(model_chunks, directory, hint="")
    return loaded["best"]


def _checked_common_state(directory: Path, root: Path, model_chunks, config: ExperimentConfig, *, hint: str, log) -> dict:
    """Verifies the files against the manifest and the model against the saved config,
    then reads megatron's common state (``common.pt``)."""
    manifest = read_manifest(directory, hint=hint)
    if manifest is None:
        log(f"{directory} has no {MANIFEST} (saved by an earlier version): its files cannot be verified")
    else:
        verify(directory, manifest, hint=hint)
    saved_config, config_path = read_saved_config(directory, root)
    check_same_model(
        saved_config=saved_config,
        saved_facts=manifest.get("facts") if manifest else None,
        config=config,
        facts=model_facts(_model(model_chunks), config),
        where=directory,
        config_path=config_path,
    )
    try:
        common = dist_checkpointing.load_common_state_dict(str(directory))
    except (Exception, CheckpointException) as error:
        raise CheckpointError(f"{directory / 'common.pt'} cannot be read ({_reason(error)}){hint}") from None
    if not isinstance(common, dict):
        raise CheckpointError(f"{directory / 'common.pt'} is corrupt: not megatron's common state{hint}")
    return common


def _strict_load(template: dict, directory: Path, *, hint: str, may_remain: tuple[str, ...]) -> dict:
    """megatron's load, refusing tensors of the checkpoint the model lacks and the reverse
    (beyond the configs the manifest compares: older checkpoints, hand-edited configs).
    Checkpoint keys starting with ``may_remain`` are allowed to stay unread."""
    try:
        loaded, missing, unexpected = load_distributed_checkpoint(template, str(directory), strict=StrictHandling.RETURN_ALL)
    except (Exception, CheckpointException) as error:
        raise CheckpointError(f"{directory} cannot be loaded: {_reason(error)}{hint}") from None
    dropped = sorted(key for key in missing if not key.startswith(may_remain))
    if unexpected:
        raise CheckpointError(
            f"{directory} lacks {len(unexpected)} tensors this model has ({_some(unexpected)}): it was saved by "
            "another model; load it with the settings that saved it, or start without --load"
        )
    if dropped:
        raise CheckpointError(
            f"{directory} holds {len(dropped)} tensors this model does not have ({_some(dropped)}): loading would "
            "drop them; load it with the settings that saved it, or start without --load"
        )
    return loaded


def _load_dynamic_tables(model_chunks, directory: Path, *, hint: str) -> None:
    """Dynamic tables (their rows are not in the dist checkpoint) from their own files,
    re-routed to this run's ranks."""
    for collection in collections_of(_model(model_chunks)):
        try:
            load_collection(collection, directory)
        except CheckpointError:
            raise
        except ValueError as error:  # its messages name the file and the mismatch
            raise CheckpointError(f"{error}{hint}") from None
        except Exception as error:  # e.g. unpickling a damaged file
            raise CheckpointError(f"{directory}: dynamic-table files cannot be read ({_reason(error)}){hint}") from None


def _reason(error: BaseException) -> str:
    """The first line of what went wrong, unwrapped from torch's per-rank exception."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _some(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
