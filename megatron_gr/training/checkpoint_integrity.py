"""Checksums of every file of a checkpoint: written at save, verified before loading.

``manifest.json`` in a checkpoint directory lists each file's size and sha256 (the format
``sha256sum`` prints, so a user can check a copy by hand) and the facts of the model that
saved it (``checkpoint_compare``). It is written into the temporary directory after every
file, before the rename that makes the checkpoint visible, so a complete checkpoint always
has one. Both hashing and verifying are spread over the ranks (each takes every world-th
file of the sorted list) and the results are shared, so every rank reports the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megatron_gr.training.checkpoint_errors import CheckpointError
from megatron_gr.training.checkpoint_layout import MANIFEST

FORMAT = 1
_CHUNK = 8 << 20


def _rank_world() -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _from_rank_0(value):
    """Rank 0's ``value`` on every rank (so that all ranks split the same file list, even
    where a shared file system shows other nodes' files late)."""
    rank, world = _rank_world()
    if world == 1:
        return value
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(value) -> list:
    rank, world = _rank_world()
    if world == 1:
        return [value]
    gathered = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def _files(directory: Path) -> list[str]:
    """Every file under ``directory`` but the manifest, as sorted relative paths."""
    own = {directory / MANIFEST, directory / f".{MANIFEST}.tmp"}
    return sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*") if path.is_file() and path not in own)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, *, facts: dict) -> None:
    """Hashes every file of ``directory`` and writes its manifest (collective; rank 0
    writes). Call after every rank finished writing its files."""
    rank, world = _rank_world()
    names = _from_rank_0(_files(directory) if rank == 0 else None)
    mine = {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_of(directory / name)} for name in names[rank::world]}
    files = {}
    for part in _all_gather(mine):
        files.update(part)
    if rank == 0:
        manifest = {"format": FORMAT, "facts": facts, "files": dict(sorted(files.items()))}
        tmp = directory / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, directory / MANIFEST)


def read_manifest(directory: Path, *, hint: str = "") -> Optional[dict]:
    """The manifest of ``directory``; None for a checkpoint written before manifests."""
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError
        for entry in files.values():
            int(entry["bytes"]), str(entry["sha256"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{path} is corrupt (not a manifest of format {FORMAT}){hint}") from None
    return manifest


def _problem(directory: Path, name: str, entry: dict) -> Optional[str]:
    path = directory / name
    if not path.is_file():
        return f"{path} is missing (listed in {MANIFEST})"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{path} is damaged: {size} bytes where {MANIFEST} records {entry['bytes']} (truncated or overwritten)"
    if sha256_of(path) != entry["sha256"]:
        return f"{path} is damaged: its sha256 differs from the one in {MANIFEST} (the bytes changed after the save)"
    return None


def verify(directory: Path, manifest: dict, *, hint: str = "") -> None:
    """Checks every listed file's size and sha256 (collective); raises one CheckpointError
    naming the first damaged file, the same on every rank."""
    rank, world = _rank_world()
    names = sorted(manifest["files"])
    mine = [(name, p) for name in names[rank::world] if (p := _problem(directory, name, manifest["files"][name]))]
    problems = sorted(p for part in _all_gather(mine) for p in part)
    if problems:
        more = f" (and {len(problems) - 1} more damaged files)" if len(problems) > 1 else ""
        raise CheckpointError(f"{problems[0][1]}{more}{hint}")


def looks_complete(directory: Path) -> bool:
    """A cheap check (no hashing) for suggesting a checkpoint: its manifest is readable and
    every file it lists is there with its size; without a manifest (older checkpoints),
    megatron's ``.metadata`` and ``common.pt`` are there."""
    try:
        manifest = read_manifest(directory)
    except CheckpointError:
        return False
    if manifest is None:
        return (directory / ".metadata").is_file() and (directory / "common.pt").is_file()
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            return False
    return True
