"""One rank of a 2-rank gloo run (started by test_distributed_timeout.py) whose rank 1
hangs instead of taking its first step: ``python hang_worker.py <megatron-gr arguments>``."""

from __future__ import annotations

import os
import sys
import time

if __name__ == "__main__":
    from megatron_gr.cli import main
    from megatron_gr.training.trainer import Trainer

    if os.environ["RANK"] == "1":
        Trainer.launch_step = lambda self: time.sleep(600)
    sys.exit(main(sys.argv[1:]))
