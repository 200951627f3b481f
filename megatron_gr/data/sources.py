"""From a named data source to :class:`UserSequences`: the entry points tools and training share.

A source is a raw file in one of :data:`RAW_FORMATS` (read, then grouped per user) or a
prepared directory (loaded, memory-mapped). Synthetic events come from
:func:`megatron_gr.data.synthetic.generate` and go through :func:`build_sequences` the same way.
:func:`infer_source` tells a path's source from what it holds.
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_gr.data.errors import DataFormatError
from megatron_gr.data.movielens import LAYOUTS, MOVIELENS_FORMATS, read_movielens
from megatron_gr.data.prepared import MANIFEST_NAME, is_prepared, load_prepared
from megatron_gr.data.sequences import RawEvents, UserSequences

RAW_FORMATS = ("auto",) + MOVIELENS_FORMATS
"""Formats of raw event files; ``auto`` tells them apart by file name."""


def load_events(format: str, path: str | os.PathLike) -> RawEvents:
    """Reads the raw events at ``path`` (a file, or a release directory holding one)."""
    if format not in RAW_FORMATS:
        raise ValueError(
            f"unknown raw data format {format!r}; expected one of {', '.join(RAW_FORMATS)}"
        )
    return read_movielens(path, format=format)


def build_sequences(events: RawEvents) -> UserSequences:
    """Groups raw events into time-sorted per-user sequences; rejects an empty event set."""
    if len(events) == 0:
        raise DataFormatError("no events to build sequences from; the source holds no interactions")
    return UserSequences.from_events(events)


def load_sequences(
    path: str | os.PathLike, *, format: str = "auto", mmap: bool = True
) -> UserSequences:
    """The sequences at ``path``: a prepared directory if it is one, else a raw ``format`` file.

    Args:
        path: a prepared directory (see :mod:`megatron_gr.data.prepared`) or raw data.
        format: the raw format when ``path`` is not prepared (one of :data:`RAW_FORMATS`).
        mmap: memory-map a prepared directory's arrays instead of reading them.
    """
    if is_prepared(path):
        return load_prepared(path, mmap=mmap)
    return build_sequences(load_events(format, path))


def resolve_source(source: str, path: str | os.PathLike | None) -> str:
    """``source`` itself, or for ``auto`` the source ``path`` holds (``synthetic`` without a
    path). Errors as in :func:`infer_source`."""
    if source != "auto":
        return source
    return "synthetic" if path is None else infer_source(path)


def infer_source(path: str | os.PathLike) -> str:
    """The data source a path holds: ``prepared`` (a directory with a prepared manifest) or
    ``movielens`` (``u.data``, ``ratings.dat`` or ``ratings.csv``, or a directory holding
    one of them).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataFormatError: ``path`` is neither; the message names what was looked for.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"data path {path} does not exist; expected a MovieLens ratings file, a directory "
            "holding one, or a prepared dataset directory"
        )
    if path.is_dir() and is_prepared(path):
        return "prepared"
    names = [layout.file_name for layout in LAYOUTS]
    if (path.is_file() and path.name in names) or (
        path.is_dir() and any((path / name).is_file() for name in names)
    ):
        return "movielens"
    what = "file" if path.is_file() else "directory"
    raise DataFormatError(
        f"cannot tell what data the {what} {path} holds: expected a MovieLens ratings file "
        f"({', '.join(names)}) or a directory holding one, or a prepared dataset directory (with "
        f"{MANIFEST_NAME}, written by tools/prepare_data.py, which also reads ratings files of "
        "other names)"
    )
