"""Decisions every rank shares, on two gloo processes: a signal one rank received stops all
of them after the same step; rank 0's lock error reaches every rank; a damaged file found by
one rank is reported by all."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from megatron_gr.training.run_lock import LOCK
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_two_ranks_agree(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then"}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = []
    for rank in (0, 1):
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        command = [sys.executable, str(REPO_ROOT / "tests" / "unit" / "training" / "collective_worker.py"), str(tmp_path)]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    reports = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    for report in reports:
        assert report["before"] is None
        assert report["after"] == "SIGUSR1 received"
        assert "is being written by another run (pid 1 on elsewhere" in report["lock"]
        assert report["verify"].startswith(f"{tmp_path / 'files' / 'f3.bin'} is damaged")
