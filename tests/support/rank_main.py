"""One rank of :func:`tests.support.multirank.run_ranks` (forked by it, :func:`forked`) or
of any launcher that sets torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)::

    python -m tests.support.rank_main MODULE:FUNCTION PAYLOAD.pt RESULT.pt ERRORS_DIR

Starts the gloo process group, calls the function with the payload, saves rank 0's return
value; a failing rank writes its traceback to ``ERRORS_DIR/rank<N>.txt`` for the report.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist


def main(argv: list[str] | None = None) -> int:
    target, payload_file, result_file, errors = (sys.argv[1:] if argv is None else argv)[:4]
    module, function = target.split(":")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        payload = torch.load(payload_file, weights_only=False)
        result = getattr(importlib.import_module(module), function)(payload)
        if rank == 0:
            torch.save(result, result_file)
    except BaseException:
        (Path(errors) / f"rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        _shutdown()
    return 0


def forked(rank: int, world: int, port: int, env: dict, cwd: str, argv: list[str], log: str) -> None:
    """A rank forked from the harness's preloaded fork server: the launcher's environment
    (torchrun's variables, one thread) and directory, output to ``log``, and a process group
    of its own so that the harness can end the rank with whatever it started."""
    os.setsid()
    os.chdir(cwd)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.environ.clear()
    os.environ.update(env, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    gc.freeze()  # the preloaded modules: megatron's checkpointing runs full collections
    sys.exit(main(argv))


def _shutdown() -> None:
    """Megatron's parallel state (when the function built one) and the process group: an
    open gloo group delays the exit."""
    if "megatron_gr.training.runtime" in sys.modules:
        sys.modules["megatron_gr.training.runtime"].shutdown()
    elif dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":  # dist_checkpointing's save starts spawn workers that import this module
    sys.exit(main())
