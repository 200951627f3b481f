"""The multi-rank harness's failure message: its first line says which run failed, how, and
which rank raised what; the tails of that rank's traceback and of the launcher's output
follow. A failing rank ends the run; a hung run is killed with whatever its ranks started."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.multirank import MultiRankError, failure_report, run_ranks


def test_the_first_line_names_the_rank_that_failed_first(tmp_path):
    cause, collateral = tmp_path / "rank3.txt", tmp_path / "rank0.txt"
    cause.write_text("Traceback (most recent call last):\n" + "  frame\n" * 100
                     + "AssertionError: step 1 gradient w: max difference 1e-3 > 1e-9\n")
    collateral.write_text("Traceback (most recent call last):\n  File \"x.py\"\nRuntimeError: Connection closed by peer\n")
    os.utime(cause, ns=(1_000_000_000, 1_000_000_000))  # written first
    os.utime(collateral, ns=(2_000_000_000, 2_000_000_000))
    output = "\n".join(f"torchrun line {i}" for i in range(200))
    report = failure_report("f on 4 ranks: exit code 1", output, tmp_path)
    first, *rest = report.splitlines()
    assert first == "f on 4 ranks: exit code 1; rank 3: AssertionError: step 1 gradient w: max difference 1e-3 > 1e-9"
    assert "Connection closed" not in report  # a rank that lost its peer is not the cause
    assert rest[0] == "--- rank3 traceback (tail) ---" and len(rest) < 100
    assert rest[-1] == "torchrun line 199" and "torchrun line 150" not in report


def test_without_rank_reports_the_launcher_output_tells(tmp_path):
    report = failure_report("cli on 2 ranks: no result after 600 s (killed)", "line a\nline b\n", None)
    assert report.splitlines() == ["cli on 2 ranks: no result after 600 s (killed)", "--- torchrun output (tail) ---",
                                   "line a", "line b"]


def test_a_failing_rank_ends_the_run_and_is_named(tmp_path):
    """The ranks still waiting on it are ended (not left to the timeout)."""
    with pytest.raises(MultiRankError) as failure:
        run_ranks(3, "tests.support.harness_ranks:fail_on_rank_one", str(tmp_path), workdir=tmp_path, timeout=300)
    first, *rest = str(failure.value).splitlines()
    assert first.startswith("tests.support.harness_ranks:fail_on_rank_one on 3 ranks: exit code ")
    assert first.endswith("; rank 1: AssertionError: rank 1 went wrong")
    assert "[rank2]: rank 2 started" in rest  # the ranks' output follows


def test_a_hung_run_is_killed_with_what_its_ranks_started(tmp_path):
    with pytest.raises(MultiRankError, match="no result after 3 s"):
        run_ranks(2, "tests.support.harness_ranks:hang_with_a_child", str(tmp_path), workdir=tmp_path, timeout=3)
    children = [int((tmp_path / f"pids{rank}.txt").read_text()) for rank in (0, 1)]
    assert not [pid for pid in children if _running(pid)]


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan waits for the init process to reap it)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"
