"""Runs a scenario of ``worker.py`` on several gloo ranks (one process each) from pytest."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(world_size: int, scenarios: str, workdir: Path, *, timeout: float = 600) -> None:
    """Starts ``world_size`` ranks of ``python -m tests.unit.embeddings.worker scenarios
    workdir`` (comma-separated scenarios, run in order) and fails with every rank's output
    when one fails or hangs."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "tests.unit.embeddings.worker", scenarios, str(workdir)]
    ranks = [
        subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=REPO_ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world_size)
    ]
    outputs, failed = [], False
    for rank in ranks:
        try:
            out, _ = rank.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in ranks:
                other.kill()
            out, _ = rank.communicate()
            failed = True
        outputs.append(out)
        failed |= rank.returncode != 0
    if failed:
        report = "\n".join(f"----- rank {r} (exit {p.returncode}) -----\n{o[-4000:]}" for r, (p, o) in enumerate(zip(ranks, outputs)))
        raise AssertionError(f"{scenarios} on {world_size} ranks failed:\n{report}")
