"""Dynamic tables on disk: full saves (inside the training checkpoint), incremental dumps,
and loading either under any number of ranks.

Layout of one save or dump directory::

    dynamic_embeddings/<physical table>/
        manifest.json        {"format", "kind": "full" | "delta", "world_size", "step", "table"}
        rank_00000.pt ...    one file per saving rank: its rows (ids, tags, scores, vectors,
                             optimizer state), admission counters; a delta also lists the
                             ids removed since the previous dump

Saves into a training checkpoint are atomic with it (written into the checkpoint's
temporary directory before the rename); a dump writes a temporary sibling and renames it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_gr.embeddings.dynamic.collection import DynamicEmbeddingCollection
from megatron_gr.embeddings.dynamic.state import export_state, restore_state
from megatron_gr.embeddings.dynamic.table import PhysicalTable

FORMAT = 1
SUBDIR = "dynamic_embeddings"


def _rank_world(group) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def describe(table: PhysicalTable) -> dict:
    """What a saved table must match to load: width, optimizer state and logical tables
    (their ids' initial values depend on seed and init_std). Capacity, buckets and policies
    may change between runs."""
    return {
        "dim": table.dim,
        "optimizer": table.settings.optimizer,
        "features": [[f.name, f.seed, f.init_std] for f in table.features],
    }


def _write(table: PhysicalTable, directory: Path, state: dict, *, kind: str, group) -> None:
    rank, world = _rank_world(group)
    folder = directory / SUBDIR / table.name
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / f"rank_{rank:05d}.pt")
    if rank == 0:
        manifest = {"format": FORMAT, "kind": kind, "world_size": world, "step": table.step, "table": describe(table)}
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def _read(table: PhysicalTable, directory: Path) -> tuple[dict, Iterator[dict]]:
    """The manifest (checked against ``table``) and the saving ranks' states, loaded one at
    a time as the iterator advances."""
    folder = Path(directory) / SUBDIR / table.name
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(
            f"{directory} holds no state of dynamic table '{table.name}' (no {manifest_path}): it was saved "
            "by a model without this table, or under another table name or coalescing group"
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')!r}, this version reads {FORMAT}")
    expected = describe(table)
    for key, value in expected.items():
        if manifest["table"].get(key) != value:
            raise ValueError(
                f"{manifest_path}: dynamic table '{table.name}' was saved with {key}={manifest['table'].get(key)!r} "
                f"but this run configures {key}={value!r}: load it with the table configuration that saved it, "
                "or start without --load"
            )
    parts = (torch.load(folder / f"rank_{r:05d}.pt", map_location="cpu", weights_only=True) for r in range(manifest["world_size"]))
    return manifest, parts


# ----------------------------------------------------------------- checkpoints
def save_collection(collection: DynamicEmbeddingCollection, directory: str | Path, *, with_optimizer: bool = True) -> None:
    """Every rank writes its shard of every table under ``directory`` (collective: rank 0
    writes the manifests)."""
    for table in collection.tables.values():
        _write(table, Path(directory), export_state(table, with_optimizer=with_optimizer), kind="full", group=collection.group)


def load_collection(collection: DynamicEmbeddingCollection, directory: str | Path) -> None:
    """Restores every table from a save under ``directory`` made by any number of ranks."""
    rank, world = _rank_world(collection.group)
    for table in collection.tables.values():
        manifest, parts = _read(table, Path(directory))
        if manifest["kind"] != "full":
            raise ValueError(f"{directory}: a {manifest['kind']} dump of '{table.name}' needs its base: use load_dumps")
        restore_state(table, parts, rank=rank, world=world)


# ------------------------------------------------------------- offline tools
def saved_tables(directory: str | Path) -> dict[str, dict]:
    """``{physical table: its manifest}`` of the dynamic tables saved under ``directory``."""
    root = Path(directory) / SUBDIR
    if not root.is_dir():
        return {}
    return {
        folder.name: json.loads((folder / "manifest.json").read_text())
        for folder in sorted(root.iterdir())
        if (folder / "manifest.json").is_file()
    }


def read_saved_table(directory: str | Path, name: str) -> dict:
    """The rows of table ``name`` saved under ``directory`` (a full save by any number of
    ranks), merged into one state: ``{"step", "rows", "optimizer"?, "admission"?}``."""
    folder = Path(directory) / SUBDIR / name
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("format") != FORMAT or manifest.get("kind") != "full":
        raise ValueError(f"{folder / 'manifest.json'}: not a full save of format {FORMAT}")
    parts = [torch.load(folder / f"rank_{r:05d}.pt", map_location="cpu", weights_only=True) for r in range(manifest["world_size"])]
    return _merge_parts(parts)


def write_saved_table(directory: str | Path, name: str, *, description: dict, state: dict) -> None:
    """Writes one table's merged state (:func:`read_saved_table`) under ``directory`` as a
    full save of one rank, which :func:`load_collection` re-routes to any number of ranks."""
    folder = Path(directory) / SUBDIR / name
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "rank_00000.pt")
    manifest = {"format": FORMAT, "kind": "full", "world_size": 1, "step": state["step"], "table": description}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


# ---------------------------------------------------------------------- dumps
def dump(collection: DynamicEmbeddingCollection, directory: str | Path, *, incremental: bool) -> None:
    """A full dump, or the rows changed (and ids removed) since the previous dump. The first
    dump of a run must be full; it starts the bookkeeping of removed ids."""
    directory = Path(directory)
    rank, _ = _rank_world(collection.group)
    tmp = directory.parent / f".tmp-{directory.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier(collection.group)
    for table in collection.tables.values():
        if incremental and not table.track_removals:
            raise ValueError(f"dynamic table '{table.name}': an incremental dump needs a full dump before it")
        state = export_state(table, changed_only=incremental)
        if incremental:
            removed = table.removed or [(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int32))]
            state["removed"] = {"keys": torch.cat([k.cpu() for k, _ in removed]), "tags": torch.cat([t.cpu() for _, t in removed])}
        _write(table, tmp, state, kind="delta" if incremental else "full", group=collection.group)
        table.index.changed.zero_()
        table.removed = []
        table.track_removals = True
    _barrier(collection.group)
    if rank == 0:
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
    _barrier(collection.group)


def load_dumps(collection: DynamicEmbeddingCollection, directories: Iterable[str | Path]) -> None:
    """Restores a full dump followed by its incremental dumps, in order."""
    directories = [Path(d) for d in directories]
    rank, world = _rank_world(collection.group)
    for table in collection.tables.values():
        rows: Optional[dict] = None
        for position, directory in enumerate(directories):
            manifest, parts = _read(table, directory)
            expected = "full" if position == 0 else "delta"
            if manifest["kind"] != expected:
                raise ValueError(f"{directory}: expected a {expected} dump of '{table.name}' at position {position}, found {manifest['kind']}")
            merged = _merge_parts(list(parts))
            rows = merged if rows is None else _apply_delta(rows, merged)
        restore_state(table, [rows], rank=rank, world=world)


def _merge_parts(parts: list[dict]) -> dict:
    """One state from the shards of one dump (their rows are disjoint)."""
    out = {"step": parts[0]["step"]}
    for section in ("rows", "optimizer", "admission", "removed"):
        present = [part[section] for part in parts if section in part]
        if present:
            out[section] = {name: torch.cat([p[name] for p in present]) for name in present[0]}
    return out


def _apply_delta(state: dict, delta: dict) -> dict:
    """Rows of ``state`` minus the delta's removed and changed ids, plus its changed rows."""
    rows = state["rows"]
    gone_keys = torch.cat([delta["removed"]["keys"], delta["rows"]["keys"]])
    gone_tags = torch.cat([delta["removed"]["tags"], delta["rows"]["tags"]])
    keep = ~_pair_isin(rows["keys"], rows["tags"], gone_keys, gone_tags)
    out = {"step": delta["step"]}
    out["rows"] = {name: torch.cat([rows[name][keep], delta["rows"][name]]) for name in rows}
    if "optimizer" in state:
        out["optimizer"] = {name: torch.cat([state["optimizer"][name][keep], delta["optimizer"][name]]) for name in state["optimizer"]}
    if "admission" in delta:
        out["admission"] = delta["admission"]
    return out


def _pair_isin(keys: torch.Tensor, tags: torch.Tensor, other_keys: torch.Tensor, other_tags: torch.Tensor) -> torch.Tensor:
    """Whether each (key, tag) is among the other pairs."""
    pairs = torch.stack([torch.cat([keys, other_keys]), torch.cat([tags, other_tags]).to(torch.int64)], dim=1)
    _, group = torch.unique(pairs, dim=0, return_inverse=True)
    present = torch.zeros(int(group.max()) + 1 if group.numel() else 0, dtype=torch.bool)
    present[group[keys.numel():]] = True
    return present[group[: keys.numel()]]


def _barrier(group) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def collections_of(module: torch.nn.Module) -> list[DynamicEmbeddingCollection]:
    return [m for m in module.modules() if isinstance(m, DynamicEmbeddingCollection)]
