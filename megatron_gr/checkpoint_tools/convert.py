"""``megatron-gr checkpoint convert``: a checkpoint directory to one file, and back.

    convert DIR --out FILE.pt|FILE.safetensors   weights and dynamic-table rows (plus the
                                                 optimizer state with --with-optimizer)
    convert FILE --out DIR                       a checkpoint directory that --load reads
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megatron_gr.checkpoint_tools.content import content_of
from megatron_gr.checkpoint_tools.single_file import SUFFIXES, file_kind, read_file, write_file
from megatron_gr.checkpoint_tools.source import offline_process_group, open_checkpoint
from megatron_gr.checkpoint_tools.writer import check_new_output, write_checkpoint
from megatron_gr.training.checkpoint_errors import CheckpointError


def convert(source: str | Path, out: str | Path, *, dtype: Optional[torch.dtype] = None, with_optimizer: bool = False) -> str:
    """Converts ``source`` (a checkpoint directory or a converted file) into ``out``; returns
    a line saying what was written."""
    source, out = Path(source), Path(out)
    if source.suffix in SUFFIXES and not source.is_dir():
        if with_optimizer:
            raise CheckpointError("--with-optimizer applies to convert DIR --out FILE: a file converts back with what it holds")
        content = read_file(source)
        written = write_checkpoint(content, out, dtype=dtype, where=str(source))
        what = "weights and optimizer state (resumes at its step)" if content.lossless else "weights only (a run starts from them at step 0)"
        return f"wrote {written}: {what}"
    if out.suffix not in SUFFIXES:
        raise CheckpointError(
            f"--out {out}: convert DIR --out FILE writes a .pt or .safetensors file; to rewrite a checkpoint directory "
            "under another parallel layout use `megatron-gr checkpoint reshard`"
        )
    file_kind(out)
    check_new_output(out)
    checkpoint = open_checkpoint(source)
    with offline_process_group():
        content = content_of(checkpoint, with_optimizer=with_optimizer, dtype=dtype)
    write_file(content, out)
    tables = sum(int(t["state"]["rows"]["keys"].numel()) for t in content.dynamic_tables.values())
    return (f"wrote {out}: step {content.iteration}, {len(content.weights)} weight tensors"
            + (f", {tables} dynamic-table rows" if content.dynamic_tables else "")
            + (f", {len(content.optimizer)} optimizer-state tensors" if content.optimizer else ""))
