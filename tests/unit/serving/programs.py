"""The exported program files the serving tests read, each deserialized once: the module
fixtures write a file once and no test changes it, while ``torch.export.load`` takes seconds
per call (~5 s for the ULTRA-HSTU program on one CPU core)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch


@functools.lru_cache(maxsize=None)
def _load(path: Path) -> tuple[torch.export.ExportedProgram, dict]:
    files = {"megatron_gr.json": ""}
    program = torch.export.load(path, extra_files=files)
    return program, json.loads(files["megatron_gr.json"])


def program_module(path: Path) -> torch.nn.Module:
    """A new callable module of the program at ``path`` (as ``torch.export.load(path).module()``)."""
    return _load(Path(path))[0].module()


def program_metadata(path: Path) -> dict:
    """The ``megatron_gr.json`` the program at ``path`` carries."""
    return _load(Path(path))[1]
