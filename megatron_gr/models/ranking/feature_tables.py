"""The feature tables of a ranking model's first pipeline stage (DLRM-HSTU and ULTRA-HSTU
alike): their presence there and the evaluation cache of the sharded ones."""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch

from megatron_gr.embeddings.base import EmbeddingTable


def first_stage_tables(tables: Optional[dict[str, EmbeddingTable]], *, pre_process: bool) -> Optional[torch.nn.ModuleDict]:
    """The tables as a module of the first stage (``pre_process``); None on other stages."""
    if pre_process and not tables:
        raise ValueError("the first pipeline stage needs the feature tables")
    return torch.nn.ModuleDict(tables) if pre_process else None


def vocabulary_cache(
    tables: torch.nn.ModuleDict, vocabularies: dict[str, torch.Tensor], device: torch.device
) -> ContextManager[None]:
    """Every table with a vocabulary (sharded, dynamic tables) reads all of its ids once,
    so evaluation batches need no exchange between ranks (which may hold different
    numbers of them)."""
    stack = contextlib.ExitStack()
    for name, table in tables.items():
        if name in vocabularies:
            stack.enter_context(table.evaluation_cache(vocabularies[name].to(device)))
    return stack
