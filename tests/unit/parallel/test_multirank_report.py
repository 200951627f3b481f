"""The multi-rank harness's failure message: its first line says which run failed, how, and
which rank raised what; the tails of that rank's traceback and of torchrun's output follow."""

from __future__ import annotations

import os

from tests.support.multirank import failure_report


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
