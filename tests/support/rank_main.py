"""One rank of :func:`tests.support.multirank.run_ranks` (started by torchrun):

    python -m tests.support.rank_main MODULE:FUNCTION PAYLOAD.pt RESULT.pt ERRORS_DIR

Starts the gloo process group, calls the function with the payload, saves rank 0's return
value; a failing rank writes its traceback to ``ERRORS_DIR/rank<N>.txt`` for the report.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> int:
    target, payload_file, result_file, errors = sys.argv[1:5]
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


def _shutdown() -> None:
    """Megatron's parallel state (when the function built one) and the process group: an
    open gloo group delays the exit."""
    if "megatron_gr.training.runtime" in sys.modules:
        sys.modules["megatron_gr.training.runtime"].shutdown()
    elif dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":  # dist_checkpointing's save starts spawn workers that import this module
    sys.exit(main())
