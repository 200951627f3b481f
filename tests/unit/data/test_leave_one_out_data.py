"""What a run reads: the source a path holds, the line the run starts with, repeated events,
and data no leave-one-out split can train on (one clear line, from the CLI too)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_gr.config.data_config import DataConfig
from megatron_gr.data import DataFormatError, save_prepared
from megatron_gr.data.synthetic import SyntheticSpec
from megatron_gr.data.leave_one_out_data import load_training_data


def _u_data(directory, rows) -> str:
    """Writes ``rows`` (user, item, timestamp) as ``directory/u.data``; returns the directory."""
    directory.mkdir(exist_ok=True)
    (directory / "u.data").write_text("".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in rows))
    return str(directory)


# user 1: 5 events, one of them repeated; user 2: 4 events; user 3: 2 events (dropped)
ROWS = [(1, 10, 1), (1, 11, 2), (1, 12, 3), (1, 12, 3), (1, 13, 4), (1, 14, 5),
        (2, 10, 1), (2, 15, 2), (2, 16, 3), (2, 17, 4),
        (3, 18, 1), (3, 19, 2)]


def test_the_start_line_counts_what_was_read(tmp_path):
    path = _u_data(tmp_path / "ml", ROWS)
    data = load_training_data(DataConfig(path=path))
    assert data.report.line() == (
        f"data: movielens {path}: 3 users, 10 items, 11 events (1 users with < 3 events dropped; "
        "1 duplicate (user, item, timestamp) events removed)"
    )
    assert data.split.sequences.user_ids.tolist() == [1, 2]
    assert data.split.sequences.lengths.tolist() == [5, 4]


def test_kept_duplicates_are_counted_and_the_fix_named(tmp_path):
    path = _u_data(tmp_path / "ml", ROWS)
    data = load_training_data(DataConfig(path=path, deduplicate=False))
    line = data.report.line()
    assert f"data: movielens {path}: 3 users, 10 items, 12 events" in line
    assert "1 duplicate (user, item, timestamp) events kept" in line and "data.deduplicate=true" in line
    assert data.split.sequences.lengths.tolist() == [6, 4]


def test_prepared_and_synthetic_sources_say_so(tmp_path):
    path = _u_data(tmp_path / "ml", ROWS)
    prepared = save_prepared(load_training_data(DataConfig(path=path)).split.sequences, tmp_path / "p", source="t")
    line = load_training_data(DataConfig(path=str(prepared))).report.line()
    assert line == f"data: prepared {prepared}: 2 users, 10 items, 9 events (0 users with < 3 events dropped)"
    spec = SyntheticSpec(num_users=7, num_items=30, mean_length=6.0, max_length=10, seed=2)
    synthetic = load_training_data(DataConfig(synthetic=spec))
    sequences = synthetic.split.sequences
    assert synthetic.report.line() == (
        f"data: synthetic: 7 users, {sequences.num_items} items, {sequences.num_events} events "
        "(0 users with < 3 events dropped)"
    )


def test_no_user_with_three_events_is_one_line_naming_the_data(tmp_path):
    path = _u_data(tmp_path / "ml", [(1, 10, 1), (1, 11, 2), (2, 10, 1)])
    with pytest.raises(DataFormatError) as caught:
        load_training_data(DataConfig(path=path))
    message = str(caught.value)
    assert message.startswith(f"movielens data {path}: no user has at least 3 events (all 2 have fewer)")
    assert "\n" not in message


def test_no_user_with_a_training_example_is_one_line(tmp_path):
    path = _u_data(tmp_path / "ml", [(1, 10, 1), (1, 11, 2), (1, 12, 3), (2, 10, 1), (2, 11, 2), (2, 12, 3)])
    with pytest.raises(DataFormatError, match="no user has a training example: the longest sequence has 3 events"):
        load_training_data(DataConfig(path=path))


def test_duplicates_alone_can_leave_too_few_events(tmp_path):
    """Three lines, one event: deduplicated, nothing is left to split."""
    path = _u_data(tmp_path / "ml", [(1, 10, 1)] * 3)
    with pytest.raises(DataFormatError, match="no user has at least 3 events"):
        load_training_data(DataConfig(path=path))


def test_the_cli_reports_untrainable_data_in_one_line(tmp_path):
    path = _u_data(tmp_path / "ml", [(1, 10, 1), (1, 11, 2), (2, 10, 1)])
    result = subprocess.run(
        [sys.executable, "-m", "megatron_gr.cli", "pretrain", "--cpu", "--data-path", path],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: movielens data {path}: no user has at least 3 events"
    )
