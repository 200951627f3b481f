"""One of two gloo ranks (started through the multi-rank harness by
test_collective_decisions.py) checking the decisions that every rank must share: the exit
flag of one rank, the run lock rank 0 takes, a damaged file one rank finds."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path


def decide(directory: str) -> None:
    """Writes this rank's decisions to ``DIR/report<rank>.json``."""
    import torch
    import torch.distributed as dist

    from megatron_gr.config import TrainingConfig
    from megatron_gr.training.checkpoint_errors import CheckpointError
    from megatron_gr.training.checkpoint_integrity import read_manifest, verify, write_manifest
    from megatron_gr.training.exit_conditions import ExitConditions
    from megatron_gr.training.run_lock import hold_run_lock

    rank = dist.get_rank()
    directory = Path(directory)
    report = {"rank": rank}

    exits = ExitConditions(TrainingConfig(device="cpu"), start_time=time.time(), device=torch.device("cpu"))
    report["before"] = exits.check(1)
    if rank == 1:
        exits.received = signal.SIGUSR1  # only rank 1 got the signal
    report["after"] = exits.check(2)  # several ranks: the flags of step 2 decide after step 3
    report["next"] = exits.check(3)

    try:
        hold_run_lock(str(directory / "locked"))
    except CheckpointError as error:
        report["lock"] = str(error)

    files = directory / "files"
    if rank == 0:
        files.mkdir()
        for i in range(4):
            (files / f"f{i}.bin").write_bytes(bytes([i]) * 1000)
    dist.barrier()
    write_manifest(files, facts={})
    dist.barrier()
    if rank == 0:
        data = bytearray((files / "f3.bin").read_bytes())  # hashed by rank 1 (every 2nd of 4 files)
        data[10] ^= 1
        (files / "f3.bin").write_bytes(bytes(data))
    dist.barrier()
    try:
        verify(files, read_manifest(files))
    except CheckpointError as error:
        report["verify"] = str(error)
    (directory / f"report{rank}.json").write_text(json.dumps(report))
