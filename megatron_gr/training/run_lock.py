"""One run at a time per save directory: a lock file holding the writer's host and pid.

Two runs writing one ``--save`` directory would interleave their checkpoints and leave a
``config.yaml`` that describes only one of them. The first run creates ``run.lock``
(atomically: a complete file is linked into place, which fails when one exists); a second
run stops with one line naming the holder. A lock whose holder is gone is taken over with
a notice: a dead process on this host (pid and start time checked, so a reused pid does
not count), or an earlier attempt of the same Slurm job (a requeued job keeps its id and
may restart on another node). Global rank 0 holds the lock for all ranks; it is released
when the trainer closes and, as a last resort, at interpreter exit (also after an
exception). A ``kill -9`` leaves the file behind; the next run on this host takes it over.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megatron_gr.training.checkpoint_errors import CheckpointError

LOCK = "run.lock"
_HELD: list["RunLock"] = []  # by this process, for release_all


def _start_time(pid: int) -> Optional[float]:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # no psutil, or no such process
        return None


def _alive(pid: int, started: Optional[float]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now_started = _start_time(pid)
    return started is None or now_started is None or abs(now_started - started) < 1.0


def _this_holder() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _start_time(os.getpid()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _describe(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}"


class RunLock:
    """The lock of one save directory, held by this process."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK
        self.held = False

    def acquire(self) -> Optional[str]:
        """Takes the lock; returns a notice when a stale lock was taken over. Raises
        CheckpointError when another live run holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = _this_holder()
        tmp = self.path.with_name(f".{LOCK}.{me['host']}.{me['pid']}")
        tmp.write_text(json.dumps(me) + "\n")
        notice = None
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    break
                except FileExistsError:
                    holder = self._holder()
                    if holder is None:
                        continue  # released meanwhile
                    reason = self._stale(holder, me)
                    if reason is None:
                        raise CheckpointError(
                            f"{self.path.parent} is being written by another run ({_describe(holder)}): use another "
                            f"--save directory, or stop that run (if it is gone, delete {self.path})"
                        ) from None
                    notice = f"taking over the lock {self.path} of {_describe(holder)}: {reason}"
                    self._remove_if(holder)
            else:
                raise CheckpointError(f"{self.path}: could not take the lock (other runs keep taking it)")
        finally:
            tmp.unlink(missing_ok=True)
        self.held = True
        _HELD.append(self)
        atexit.register(self.release)
        return notice

    def _holder(self) -> Optional[dict]:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"pid": None, "host": None, "garbage": True}
        return holder if isinstance(holder, dict) else {"pid": None, "host": None, "garbage": True}

    @staticmethod
    def _stale(holder: dict, me: dict) -> Optional[str]:
        """Why the holder is gone (None: it may be running)."""
        if holder.get("garbage"):
            return "the lock file is unreadable"
        if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
            return "it is this process (an earlier trainer of it)"
        if me["slurm_job_id"] and holder.get("slurm_job_id") == me["slurm_job_id"]:
            return "an earlier attempt of this Slurm job"
        if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"], holder.get("started")):
            return "that process is no longer running"
        return None

    def _remove_if(self, holder: dict) -> None:
        """Removes the lock file if it still names ``holder`` (another run may have taken
        the stale lock first)."""
        if self._holder() == holder:
            self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        _HELD.remove(self)
        holder = self._holder()
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        atexit.unregister(self.release)


def hold_run_lock(directory: Optional[str]) -> Optional[RunLock]:
    """Global rank 0 takes the lock of ``directory`` for every rank (collective: every rank
    gets the same error when it is held elsewhere) and prints a take-over notice; None
    without a save directory."""
    if not directory:
        return None
    rank = dist.get_rank() if dist.is_initialized() else 0
    lock, outcome = None, [None]
    if rank == 0:
        lock = RunLock(directory)
        try:
            outcome[0] = ("ok", lock.acquire())
        except (CheckpointError, OSError) as error:
            message = str(error) if isinstance(error, CheckpointError) else f"checkpoint.save={directory}: cannot write its lock ({error})"
            outcome[0] = ("error", message)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    status, text = outcome[0]
    if status == "error":
        raise CheckpointError(text)
    if text and rank == 0:
        print(text, flush=True)
    return lock


def release_all() -> None:
    """Releases every lock this process holds (the CLI calls it on the way out, after an
    error too; interpreter exit does the same for library use)."""
    for lock in list(_HELD):
        lock.release()
