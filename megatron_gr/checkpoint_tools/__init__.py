"""Checkpoint tools that run without training: inspect, convert to one file and back,
reshard offline, import from and export to Meta's generative-recommenders layout
(``megatron-gr checkpoint ...``)."""

from megatron_gr.checkpoint_tools.content import CheckpointContent, content_of
from megatron_gr.checkpoint_tools.convert import convert
from megatron_gr.checkpoint_tools.inspect_report import describe
from megatron_gr.checkpoint_tools.single_file import read_file, write_file
from megatron_gr.checkpoint_tools.source import SavedCheckpoint, offline_process_group, open_checkpoint
from megatron_gr.checkpoint_tools.writer import write_checkpoint

__all__ = [
    "CheckpointContent",
    "SavedCheckpoint",
    "content_of",
    "convert",
    "describe",
    "offline_process_group",
    "open_checkpoint",
    "read_file",
    "write_checkpoint",
    "write_file",
]
