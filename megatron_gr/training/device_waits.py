"""Where a training step makes the host wait for the GPU: every synchronising CUDA call of
some steps, by the Python line that made it (torch's sync debug mode, which also reports
the calls C++ makes on Python's behalf). Each such wait empties the GPU's queue while the
host catches up: a step decided on the device means not to wait at all, one decided on
the host once, for the gradient norm (``step_verdict.py``)."""

from __future__ import annotations

import collections
import warnings
from pathlib import Path

import torch


def device_waits(trainer, steps: int) -> dict[tuple[str, int], float]:
    """Runs ``steps`` training steps as the training loop does (each step's outcome read
    during the next, the last one's at the end); returns ``{(file name, line): waits per
    step}``, most frequent first."""
    counts: collections.Counter = collections.Counter()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):  # as the training loop runs them: each read during the next
                trainer.launch_step()
            trainer.settle_step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    for warning in caught:
        if "synchroniz" in str(warning.message):
            counts[(Path(warning.filename).name, warning.lineno)] += 1
    return {where: n / steps for where, n in counts.most_common()}
