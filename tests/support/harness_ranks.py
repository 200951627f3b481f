"""Rank functions for the harness's own tests (tests/unit/parallel/test_multirank_report.py)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import torch.distributed as dist


def fail_on_rank_one(workdir: str) -> None:
    """Rank 1 fails; the others wait for it at a barrier, which only their end can break."""
    print(f"rank {dist.get_rank()} started", flush=True)
    if dist.get_rank() == 1:
        raise AssertionError("rank 1 went wrong")
    dist.barrier()


def hang_with_a_child(workdir: str) -> None:
    """Every rank starts a child process and waits forever; the pids go to ``workdir``."""
    child = subprocess.Popen(["sleep", "600"])
    Path(workdir, f"pids{dist.get_rank()}.txt").write_text(f"{child.pid}\n")
    while True:
        time.sleep(1)
