"""A rank that hangs ends the job within ``training.distributed_timeout_minutes``: the
waiting rank stops with one line naming the rank that never reached the collective."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT
from tests.unit.training.checkpoint_helpers import config_file

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hung_rank_ends_the_job_with_one_line(tmp_path):
    config = config_file(tmp_path, training={"train_iters": 4, "lr_decay_iters": None, "lr_warmup_iters": 0})
    port = _free_port()
    ranks = []
    for rank in (0, 1):
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        command = [sys.executable, str(REPO_ROOT / "tests" / "unit" / "training" / "hang_worker.py"), "pretrain",
                   "--config", str(config), "--distributed-timeout-minutes", "0.1", "--progress", "off"]
        ranks.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        start = time.monotonic()
        _, err = ranks[0].communicate(timeout=300)
        elapsed = time.monotonic() - start
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    lines = err.strip().splitlines()
    assert ranks[0].returncode == 1, err[-3000:]
    assert "Traceback" not in err
    assert lines[-1].startswith("error: rank 0: a collective waited longer than training.distributed_timeout_minutes=0.1"), lines[-1]
    assert "rank 1 never reached it" in lines[-1]
    assert elapsed < 240  # model building included; the wait itself is 6 s plus 5 s to hear from the others
