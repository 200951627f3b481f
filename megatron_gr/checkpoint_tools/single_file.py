"""One file holding a checkpoint's content (:class:`CheckpointContent`): a torch file
(``.pt``) or a safetensors file (``.safetensors``), chosen by the file name.

torch (``torch.load(path, weights_only=True)`` reads it)::

    {"format": "megatron_gr.checkpoint", "version": 1, "iteration": 3, "config": {...},
     "facts": {...}, "weights": {"decoder.layers.0.uvqk_proj.weight": tensor, ...},
     "stacked": {...}, "objects": {...}, "object_keys": {...},
     "optimizer": {...} | None, "common": {...} | None,
     "dynamic_tables": {"item": {"description": {...}, "state": {"step", "rows": {...}}}}}

safetensors: the tensors under ``weights/<name>``, ``optimizer/<key>`` and
``dynamic/<table>/<section>/<field>``; the rest in the header's metadata as JSON strings
(``format``, ``version``, ``iteration``, ``config``, ``facts``, ``stacked``,
``object_keys``, ``dynamic_tables``). Objects and megatron's common state (plain Python
values) are stored as ``torch.save`` bytes in uint8 tensors (``objects/<name>``,
``common``) and read back with ``weights_only=True``.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from megatron_gr.checkpoint_tools.content import CheckpointContent
from megatron_gr.training.checkpoint_errors import CheckpointError

FORMAT = "megatron_gr.checkpoint"
VERSION = 1
SUFFIXES = (".pt", ".safetensors")


def file_kind(path: Path) -> str:
    """``torch`` or ``safetensors`` from the file name; a CheckpointError for others."""
    if path.suffix == ".safetensors":
        return "safetensors"
    if path.suffix == ".pt":
        return "torch"
    raise CheckpointError(f"{path}: the file name must end in .pt (a torch file) or .safetensors")


# ----------------------------------------------------------------------- write
def write_file(content: CheckpointContent, path: Path) -> None:
    """Writes ``content`` to ``path`` atomically (a temporary sibling renamed into place)."""
    kind = file_kind(path)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    try:
        if kind == "torch":
            torch.save(_as_dict(content), tmp)
        else:
            from safetensors.torch import save_file

            tensors, metadata = _flatten(content)
            save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _as_dict(content: CheckpointContent) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "iteration": content.iteration,
        "config": content.config,
        "facts": content.facts,
        "weights": content.weights,
        "stacked": content.stacked,
        "objects": content.objects,
        "object_keys": content.object_keys,
        "optimizer": content.optimizer,
        "common": content.common,
        "dynamic_tables": content.dynamic_tables,
    }


def _to_bytes(value: Any) -> torch.Tensor:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _from_bytes(tensor: torch.Tensor) -> Any:
    return torch.load(io.BytesIO(tensor.numpy().tobytes()), weights_only=True)


def _flatten(content: CheckpointContent) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {f"weights/{name}": t.contiguous() for name, t in content.weights.items()}
    tensors.update({f"objects/{name}": _to_bytes(value) for name, value in content.objects.items()})
    if content.optimizer is not None:
        tensors.update({f"optimizer/{key}": t.contiguous() for key, t in content.optimizer.items()})
        tensors["common"] = _to_bytes(content.common)
    tables = {}
    for table, entry in content.dynamic_tables.items():
        state = entry["state"]
        sections = {name: list(values) for name, values in state.items() if isinstance(values, dict)}
        tables[table] = {"description": entry["description"], "step": state["step"], "sections": sections}
        for section, fields in sections.items():
            for field in fields:
                tensors[f"dynamic/{table}/{section}/{field}"] = state[section][field].contiguous()
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "iteration": str(content.iteration),
        "config": json.dumps(content.config),
        "facts": json.dumps(content.facts),
        "stacked": json.dumps(content.stacked),
        "object_keys": json.dumps(content.object_keys),
        "dynamic_tables": json.dumps(tables),
    }
    # safetensors refuses tensors that share memory; each one gets its own.
    return {name: t.clone() for name, t in tensors.items()}, metadata


# ------------------------------------------------------------------------ read
def read_file(path: str | Path) -> CheckpointContent:
    """The content of a file written by :func:`write_file`; one CheckpointError line when
    it is missing, damaged or another kind of file."""
    path = Path(path)
    kind = file_kind(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        raw = _read_torch(path) if kind == "torch" else _read_safetensors(path)
    except CheckpointError:
        raise
    except Exception as error:  # truncated or foreign files fail in many ways
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(f"{path} cannot be read as a {kind} file ({type(error).__name__}: {first[:200]}): truncated or not written by `megatron-gr checkpoint convert`") from None
    return raw


def _check_header(path: Path, fmt: Any, version: Any) -> None:
    if fmt != FORMAT:
        raise CheckpointError(f"{path} is not a megatron_gr checkpoint file (format {fmt!r}; `megatron-gr checkpoint convert DIR --out FILE` writes them)")
    if int(version) != VERSION:
        raise CheckpointError(f"{path}: file version {version}, this megatron_gr reads version {VERSION}")


def _read_torch(path: Path) -> CheckpointContent:
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a megatron_gr checkpoint file (a torch file of {type(raw).__name__})")
    _check_header(path, raw.get("format"), raw.get("version", -1))
    return CheckpointContent(**{name: raw[name] for name in (
        "iteration", "config", "facts", "weights", "stacked", "objects", "object_keys", "optimizer", "common",
        "dynamic_tables")})


def _read_safetensors(path: Path) -> CheckpointContent:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
        _check_header(path, metadata.get("format"), metadata.get("version", -1))
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    prefixed = lambda prefix: {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}  # noqa: E731
    optimizer = prefixed("optimizer/") if "common" in tensors else None
    tables = {}
    for table, entry in json.loads(metadata["dynamic_tables"]).items():
        state = {"step": entry["step"]}
        for section, fields in entry["sections"].items():
            state[section] = {field: tensors[f"dynamic/{table}/{section}/{field}"] for field in fields}
        tables[table] = {"description": entry["description"], "state": state}
    return CheckpointContent(
        iteration=int(metadata["iteration"]),
        config=json.loads(metadata["config"]),
        facts=json.loads(metadata["facts"]),
        weights=prefixed("weights/"),
        stacked=json.loads(metadata["stacked"]),
        objects={name: _from_bytes(t) for name, t in prefixed("objects/").items()},
        object_keys=json.loads(metadata["object_keys"]),
        optimizer=optimizer,
        common=_from_bytes(tensors["common"]) if "common" in tensors else None,
        dynamic_tables=tables,
    )
