"""One of two gloo ranks (started by test_collective_decisions.py) checking the decisions
that every rank must share: the exit flag of one rank, the run lock rank 0 takes, a damaged
file one rank finds. ``python collective_worker.py DIR`` prints one JSON line."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    import torch
    import torch.distributed as dist

    from megatron_gr.config import TrainingConfig
    from megatron_gr.training.checkpoint_errors import CheckpointError
    from megatron_gr.training.checkpoint_integrity import read_manifest, verify, write_manifest
    from megatron_gr.training.exit_conditions import ExitConditions
    from megatron_gr.training.run_lock import hold_run_lock

    rank = int(os.environ["RANK"])
    directory = Path(sys.argv[1])
    dist.init_process_group("gloo")
    report = {"rank": rank}

    exits = ExitConditions(TrainingConfig(device="cpu"), start_time=time.time(), device=torch.device("cpu"))
    report["before"] = exits.check(1)
    if rank == 1:
        exits.received = signal.SIGUSR1  # only rank 1 got the signal
    report["after"] = exits.check(2)

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
    print(json.dumps(report), flush=True)
    dist.destroy_process_group()
