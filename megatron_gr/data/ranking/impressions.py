"""A reader for impression samples in the KuaiRand-style CSV layout of tzrec's DlrmHSTU:
one row per user request, scalar user columns, and sequence columns whose values are
joined by a delimiter (``|``), all sequence columns of a group equally long::

    user_id,user_active_degree,uih_seq__video_id,uih_seq__action_timestamp,uih_seq__action_weight,...,cand_seq__video_id,cand_seq__query_time,cand_seq__action_weight
    7,high_active,11|12|13,1650000000|1650000300|1650000600,1|0|3,...,21|22,1650000900|1650000900,1|0

Which columns are read, and as what, comes from the config: the contextual features
(scalars), the history group (ids, action bitmask, watch time, timestamp) and the
candidate group (ids, timestamp, labels). Ids may be integers or any text (hashed, see
``tokens.py``). Each user's latest request (by its latest candidate time) is test, the one
before it valid, the rest train (users with fewer than 3 requests only train).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_gr.data.errors import DataFormatError, line_error
from megatron_gr.data.ranking.samples import RankingSamples, split_by_time
from megatron_gr.data.ranking.tokens import raw_id

KINDS = ("id", "int", "float")
_EXPECTED = {"id": "an id (integer or text)", "int": "an integer", "float": "a number"}


@dataclass(frozen=True)
class ImpressionColumns:
    """The columns to read and how to parse them (``id``, ``int`` or ``float``)."""

    user: str
    """Identifies the user (GAUC groups and the split)."""
    contextual: dict[str, str]
    """Scalar columns, one per contextual feature."""
    history: dict[str, str]
    """Sequence columns of the history (equally long in a row; may be empty)."""
    candidates: dict[str, str]
    """Sequence columns of the candidates (equally long, at least one value)."""
    candidate_timestamp: str
    """The candidate column holding impression times (a user's query time is the latest)."""


def read_impressions(path: str | os.PathLike, columns: ImpressionColumns, *, delimiter: str = "|") -> RankingSamples:
    """Reads ``path``; DataFormatError for a column the config names that the file lacks,
    or a malformed row (naming the file, the line and what was expected)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected an impression CSV file (data.path)")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise DataFormatError(f"{path} is empty; expected a header line naming the columns")
        index = _column_index(path, header, columns)
        parsed = _Rows(columns)
        for row in reader:
            parsed.add(path, reader.line_num, row, index, delimiter, len(header))
    if not parsed.users:
        raise DataFormatError(f"{path} has a header but no rows; expected one row per user request")
    return parsed.samples()


def _column_index(path: Path, header: list[str], columns: ImpressionColumns) -> dict[str, int]:
    position = {name.strip(): i for i, name in enumerate(header)}
    wanted = [columns.user, *columns.contextual, *columns.history, *columns.candidates]
    for name in wanted:
        if name not in position:
            raise DataFormatError(
                f"column {name!r} (named by the config) is not in {path}; its columns: {', '.join(position)}"
            )
    return {name: position[name] for name in wanted}


class _Rows:
    """Columns accumulated row by row."""

    def __init__(self, columns: ImpressionColumns):
        self.columns = columns
        self.users: list[int] = []
        self.contextual = {name: [] for name in columns.contextual}
        self.events = {name: [] for name in columns.history}
        self.candidates = {name: [] for name in columns.candidates}
        self.history_lengths: list[int] = []
        self.candidate_counts: list[int] = []

    def add(self, path: Path, line: int, row: list[str], index: dict[str, int], delimiter: str, width: int) -> None:
        if not row:
            return  # a blank line
        text = ",".join(row)
        if len(row) != width:
            raise line_error(path, line, text, f"{len(row)} fields", f"{width} fields, one per header column")
        self.users.append(_value(path, line, text, self.columns.user, row[index[self.columns.user]], "id"))
        for name, kind in self.columns.contextual.items():
            self.contextual[name].append(_value(path, line, text, name, row[index[name]], kind))
        self.history_lengths.append(self._sequences(path, line, text, row, index, delimiter, self.columns.history, self.events, "history"))
        count = self._sequences(path, line, text, row, index, delimiter, self.columns.candidates, self.candidates, "candidate")
        if count == 0:
            raise line_error(path, line, text, "no candidates", "at least one value in the candidate columns")
        self.candidate_counts.append(count)

    @staticmethod
    def _sequences(path, line, text, row, index, delimiter, kinds: dict[str, str], out: dict, group: str) -> int:
        lengths = {}
        for name, kind in kinds.items():
            field = row[index[name]].strip()
            parts = field.split(delimiter) if field else []
            out[name].extend(_value(path, line, text, name, part, kind) for part in parts)
            lengths[name] = len(parts)
        if len(set(lengths.values())) > 1:
            counts = ", ".join(f"{name}: {n}" for name, n in lengths.items())
            raise line_error(path, line, text, f"{group} columns of different lengths ({counts})",
                             f"the same number of {delimiter!r}-separated values in every {group} column")
        return next(iter(lengths.values()), 0)

    def samples(self) -> RankingSamples:
        columns = self.columns
        history_end = np.cumsum(np.asarray(self.history_lengths, dtype=np.int64))
        candidate_offsets = np.concatenate([[0], np.cumsum(self.candidate_counts)]).astype(np.int64)
        dtype = {"id": np.int64, "int": np.int64, "float": np.float64}
        candidates = {name: np.asarray(values, dtype=dtype[columns.candidates[name]]) for name, values in self.candidates.items()}
        stamps = candidates[columns.candidate_timestamp]
        query_times = np.maximum.reduceat(stamps, candidate_offsets[:-1])
        users = np.asarray(self.users, dtype=np.int64)
        samples = RankingSamples(
            user_ids=users,
            split=split_by_time(users, query_times),
            contextual={name: np.asarray(values, dtype=np.int64) for name, values in self.contextual.items()},
            history_begin=history_end - np.asarray(self.history_lengths, dtype=np.int64),
            history_end=history_end,
            events={name: np.asarray(values, dtype=dtype[columns.history[name]]) for name, values in self.events.items()},
            candidate_offsets=candidate_offsets,
            candidates=candidates,
        )
        samples.validate()
        return samples


def _value(path, line: int, text: str, column: str, field: str, kind: str):
    field = field.strip()
    try:
        if kind == "id":
            if not field:
                raise ValueError
            return raw_id(field)
        if kind == "int":
            return int(field)
        value = float(field)
        if not np.isfinite(value):
            raise ValueError
        return value
    except ValueError:
        raise line_error(path, line, text, f"column {column} holds {field!r}", _EXPECTED[kind]) from None
