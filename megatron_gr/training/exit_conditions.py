"""When a run stops early on purpose: SIGTERM/SIGUSR1, ``--exit-interval`` and
``--exit-duration-in-mins`` (Megatron's semantics: save a checkpoint, exit 0).

The signal handlers only set a flag. The exit interval is the same decision on every rank
(it depends on the step only). A signal and the duration are one rank's news: at each step
boundary every rank contributes its signal flag and whether its clock passed the duration
to one all-reduce (max), so all ranks stop after the same step and save together. With
several ranks that all-reduce is read one step later (it travels while the next step runs:
reading it at once would make every step wait for the device), so a signal or the
duration stops the run one step after the step it arrived in. Slurm sends SIGUSR1 before
the time limit (``launch/slurm_pretrain.sbatch``) and SIGTERM at the limit or on
preemption; torchrun forwards SIGTERM (and SIGUSR1 when told to, see the sbatch script).
SIGINT (Ctrl-C) is not handled here: it interrupts at once and the CLI reports it in one
line.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_gr.config.training_config import TrainingConfig
from megatron_gr.training.host_copy import HostCopy

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
        self._pending: Optional[HostCopy] = None  # the last step's all-reduced flags (several ranks)

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
        received, duration = self.received or 0, int(
            self.duration_s is not None and time.time() - self.start_time >= self.duration_s
        )
        if dist.is_initialized() and dist.get_world_size() > 1:
            received, duration = self._reduced_last_step(received, duration)
        if received:
            return f"{signal.Signals(received).name} received"
        if self.interval is not None and step % self.interval == 0:
            return f"exit interval {self.interval} reached (training.exit_interval)"
        if duration:
            return f"{self.duration_s / 60:g} minutes elapsed (training.exit_duration_in_mins)"
        return None

    def _reduced_last_step(self, received: int, duration: int) -> tuple[int, int]:
        """Starts this step's all-reduce (max) of the flags and returns the previous step's
        result (0, 0 at the first step): on a GPU its copy to the host was queued behind the
        all-reduce, and is read once the event after it has passed, without waiting for the
        work queued since."""
        flags = torch.zeros(2, dtype=torch.int64, device=self.device)  # NCCL reduces device tensors only
        flags[0].fill_(received)  # a fill, not a copy from pageable memory (which would wait)
        flags[1].fill_(duration)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        previous, self._pending = self._pending, HostCopy(flags)
        if previous is None:
            return 0, 0
        received, duration = (int(v) for v in previous.read().tolist())
        return received, duration
