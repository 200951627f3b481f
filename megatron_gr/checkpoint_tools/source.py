"""A saved checkpoint, opened and read without a training run.

:func:`open_checkpoint` takes what a user points at (a ``--save`` directory, one of its
``iter_*`` directories, or ``best/``), verifies every file against the manifest, and reads
the small parts: the saved config, megatron's common state (``common.pt``), the names,
shapes and dtypes of the tensors (``.metadata``) and the dynamic tables' manifests.
:func:`read_entries` then reads tensors at their full (global) shape, whatever layout saved
them, through megatron's own loader in a one-process group.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from megatron_gr.checkpoint_tools.layer_keys import object_key
from megatron_gr.embeddings.dynamic.checkpoint import saved_tables
from megatron_gr.training.checkpoint_compare import read_saved_config
from megatron_gr.training.checkpoint_errors import CheckpointError
from megatron_gr.training.checkpoint_integrity import read_manifest, verify
from megatron_gr.training.checkpoint_layout import BEST, MANIFEST, TRACKER, resolve_load

# Top-level groups of a training checkpoint's entries besides the model's.
OPTIMIZER_PREFIX = "optimizer."
RNG_PREFIX = "rng_state"


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass
class SavedCheckpoint:
    directory: Path
    """The checkpoint itself (``iter_*`` or ``best``)."""
    root: Path
    """The ``--save`` directory holding it."""
    config: Optional[dict]
    """The saved ``config.yaml`` (plain values), None when the checkpoint has none."""
    facts: dict
    """The model facts of the manifest (model class, item count)."""
    common: dict
    """megatron's common state: train state, schedule, optimizer settings (or the best record)."""
    tensors: dict[str, TensorInfo]
    """Every tensor by checkpoint key, at its full shape."""
    objects: list[str]
    """Keys of the saved objects (``name/shard_<offset>_<shape>``)."""
    dynamic_tables: dict[str, dict]
    """Dynamic tables saved beside the tensors: ``{name: manifest}``."""
    verified_files: Optional[int]
    """Files checked against the manifest; None without a manifest (older checkpoints)."""

    @property
    def is_best(self) -> bool:
        return "best" in self.common and "train_state" not in self.common

    @property
    def train_state(self) -> dict:
        return self.common.get("train_state", {})

    @property
    def iteration(self) -> Optional[int]:
        if self.is_best:
            return self.common["best"].get("iteration")
        return self.train_state.get("iteration")

    def model_keys(self) -> list[str]:
        """Tensor keys of the model (not optimizer state)."""
        return [key for key in self.tensors if not key.startswith(OPTIMIZER_PREFIX)]

    def model_objects(self) -> list[str]:
        return [key for key in self.objects if not key.startswith((OPTIMIZER_PREFIX, RNG_PREFIX))]


def resolve_directory(path: str | Path) -> Path:
    """The checkpoint directory ``path`` means: itself when it holds megatron's files, else
    the checkpoint its tracker file names (as ``--load`` resolves it)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: give a directory a run saved into with --save, or one of its iter_* directories")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory")
    if (path / ".metadata").exists() or (path / "common.pt").exists() or (path / MANIFEST).exists():
        return path
    target = resolve_load(path)
    if target.directory is None:
        raise CheckpointError(
            f"{path} is not a megatron_gr checkpoint: it holds no megatron .metadata/common.pt, no {TRACKER} "
            f"and no iter_* directory (a directory a run saved into with --save, one of its iter_* "
            f"directories or its {BEST}/ is needed)"
        )
    return target.directory


def open_checkpoint(path: str | Path) -> SavedCheckpoint:
    """Opens and verifies the checkpoint ``path`` means; one CheckpointError line when it is
    not a checkpoint or is damaged."""
    directory = resolve_directory(path)
    root = directory.parent
    manifest = read_manifest(directory)
    verified = None
    if manifest is not None:
        verify(directory, manifest)
        verified = len(manifest["files"])
    for required in (".metadata", "common.pt"):
        if not (directory / required).is_file():
            raise CheckpointError(f"{directory} is not a complete megatron checkpoint: {directory / required} is missing")
    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as error:  # unpickling a damaged file raises many types
        raise CheckpointError(f"{directory / '.metadata'} cannot be read ({type(error).__name__}: {error})") from None
    try:
        common = torch.load(directory / "common.pt", map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(f"{directory / 'common.pt'} cannot be read ({type(error).__name__}: {error})") from None
    if not isinstance(common, dict):
        raise CheckpointError(f"{directory / 'common.pt'} is corrupt: not megatron's common state")
    config, _ = read_saved_config(directory, root)
    tensors, objects = {}, []
    for key, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, BytesStorageMetadata):
            objects.append(key)
        else:
            tensors[key] = TensorInfo(tuple(entry.size), entry.properties.dtype)
    return SavedCheckpoint(
        directory=directory,
        root=root,
        config=config,
        facts=(manifest or {}).get("facts", {}),
        common=common,
        tensors=tensors,
        objects=sorted(objects),
        dynamic_tables=saved_tables(directory),
        verified_files=verified,
    )


@contextlib.contextmanager
def offline_process_group() -> Iterator[None]:
    """A one-process gloo group and megatron's parallel state on the CPU for the duration
    (megatron's checkpoint reader and writer are collectives); the caller's when one
    exists."""
    if dist.is_initialized():
        yield
        return
    from megatron_gr.config import TrainingConfig
    from megatron_gr.training.runtime import initialize, shutdown

    initialize(TrainingConfig(device="cpu"))
    try:
        yield
    finally:
        shutdown()


def read_entries(checkpoint: SavedCheckpoint, keys: list[str]) -> dict[str, Any]:
    """Tensors (full shape) and objects of ``checkpoint`` by checkpoint key. Call inside
    :func:`offline_process_group` (or a started process group)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    from megatron_gr.compat import load_distributed_checkpoint

    template = {}
    for key in keys:
        if key in checkpoint.tensors:
            info = checkpoint.tensors[key]
            template[key] = ShardedTensor.from_rank_offsets(key, torch.empty(info.shape, dtype=info.dtype), replica_id=0)
        else:
            name, offset, shape = object_key(key)
            template[key] = ShardedObject(name, None, shape, offset, replica_id=0)
    if not template:
        return {}
    try:
        loaded = load_distributed_checkpoint(template, str(checkpoint.directory))
    except Exception as error:
        raise CheckpointError(f"{checkpoint.directory} cannot be read: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    return {key: loaded[key] for key in keys}
