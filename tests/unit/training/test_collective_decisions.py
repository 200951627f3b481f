"""Decisions every rank shares, on two gloo processes: a signal one rank received stops all
of them after the same step (the step after the one it arrived in: the flags travel while
that step runs); rank 0's lock error reaches every rank; a damaged file found by
one rank is reported by all."""

from __future__ import annotations

import json

import pytest

from megatron_gr.training.run_lock import LOCK
from tests.support.multirank import run_ranks

pytestmark = pytest.mark.slow


def test_two_ranks_agree(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then"}))
    run_ranks(2, "tests.unit.training.collective_worker:decide", str(tmp_path), workdir=tmp_path)
    reports = [json.loads((tmp_path / f"report{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["before"] is None and report["after"] is None
        assert report["next"] == "SIGUSR1 received"
        assert "is being written by another run (pid 1 on elsewhere" in report["lock"]
        assert report["verify"].startswith(f"{tmp_path / 'files' / 'f3.bin'} is damaged")
