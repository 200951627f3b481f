"""When a run stops early on purpose: SIGTERM/SIGUSR1, ``--exit-interval`` and
``--exit-duration-in-mins`` (Megatron's semantics: save a checkpoint, exit 0).

The signal handlers only set a flag. At each step boundary every rank contributes its flag,
whether the exit interval divides the step and whether its clock passed the duration; one
all-reduce (max) makes the decision collective, so all ranks stop after the same step and
save together. Slurm sends SIGUSR1 before the time limit (``launch/slurm_pretrain.sbatch``)
and SIGTERM at the limit or on preemption; torchrun forwards SIGTERM (and SIGUSR1 when told
to, see the sbatch script). SIGINT (Ctrl-C) is not handled here: it interrupts at once and
the CLI reports it in one line.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_gr.config.training_config import TrainingConfig

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class ExitConditions:
    """A context manager around the training loop; ``check(step)`` after each step returns
    why the run must stop now (the same text on every rank), or None."""

    def __init__(self, training: TrainingConfig, *, start_time: float, device: torch.device):
        self.interval = training.exit_interval
        self.duration_s = None if training.exit_duration_in_mins is None else 60.0 * training.exit_duration_in_mins
        self.start_time = start_time
        self.device = device
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _on_signal(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> "ExitConditions":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def check(self, step: int) -> Optional[str]:
        """Collective: call on every rank after every step."""
        several = dist.is_initialized() and dist.get_world_size() > 1
        flags = torch.tensor(
            [
                self.received or 0,
                int(self.interval is not None and step % self.interval == 0),
                int(self.duration_s is not None and time.time() - self.start_time >= self.duration_s),
            ],
            dtype=torch.int64,
            device=self.device if several else "cpu",  # NCCL reduces device tensors only
        )
        if several:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        received, interval, duration = (int(v) for v in flags.tolist())
        if received:
            return f"{signal.Signals(received).name} received"
        if interval:
            return f"exit interval {self.interval} reached (training.exit_interval)"
        if duration:
            return f"{self.duration_s / 60:g} minutes elapsed (training.exit_duration_in_mins)"
        return None
