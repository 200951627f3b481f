"""One line for a collective that failed because another rank hung or died.

With ``training.distributed_timeout_minutes`` every collective gives up after that time. gloo
then raises a RuntimeError on the waiting ranks ("Timed out waiting ... for recv"), and
"Connection closed by peer" on ranks whose peer has exited; torch raises ``DistError``
subclasses for store and backend failures. This module turns those into one line naming this
rank and, where it can tell, the ranks that never reached the collective: each failing rank
records itself in the process group's store, waits a few seconds for the others to do the
same, and names the ranks that did not (they are hung, or died with their own error).

On GPUs NCCL's watchdog ends a process whose collective exceeds the timeout itself (its log
line names the rank and the operation); the job still ends within the timeout.
"""

from __future__ import annotations

import re
import time
from typing import Optional

import torch.distributed as dist

_PEER_GONE = ("Connection closed by peer", "Connection reset by peer")  # gloo
_GLOO_TIMEOUT = "Timed out waiting"
_TIMEOUT = ("Timed out", "timed out", "Timeout", "timeout")
_GRACE_S = 5.0


class DistributedFailure(RuntimeError):
    """A collective failed because of another rank; the message is one line."""


def _kind(error: BaseException) -> Optional[str]:
    text = str(error)
    if any(marker in text for marker in _PEER_GONE):
        return "peer"
    if _GLOO_TIMEOUT in text or (isinstance(error, dist.DistError) and any(m in text for m in _TIMEOUT)):
        return "timeout"
    if isinstance(error, dist.DistError):
        return "other"
    return None


def _silent_ranks(rank: int, world: int, grace_s: float) -> Optional[list[int]]:
    """Ranks that did not report a failure within ``grace_s`` (None when the store is
    unreachable: e.g. rank 0, which hosts it, is gone)."""
    try:
        # torch keeps the store of the default group private; the public API has no getter.
        store = dist.distributed_c10d._get_default_store()
        store.set(f"megatron_gr/failed/{rank}", "1")
        deadline = time.monotonic() + grace_s
        while True:
            missing = [r for r in range(world) if not store.check([f"megatron_gr/failed/{r}"])]
            if not missing or time.monotonic() >= deadline:
                return missing
            time.sleep(0.2)
    except Exception:
        return None


def describe(error: BaseException, *, timeout_minutes: float, grace_s: float = _GRACE_S) -> Optional[str]:
    """The one-line description of ``error``, or None when it is not a distributed failure
    (call while the process group still exists)."""
    kind = _kind(error)
    if kind is None or not dist.is_initialized():
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    lines = str(error).strip().splitlines()
    first = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else type(error).__name__  # gloo's source location
    silent = _silent_ranks(rank, world, grace_s) if world > 1 else None
    who = ""
    if silent:
        who = f"; rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} never reached it (hung, or died: see {'their' if len(silent) > 1 else 'its'} log)"
    if kind == "timeout":
        return (
            f"rank {rank}: a collective waited longer than training.distributed_timeout_minutes="
            f"{timeout_minutes:g} for the other ranks{who} ({first})"
        )
    if kind == "peer":
        return f"rank {rank}: another rank left a collective (it failed or was stopped: see its log){who} ({first})"
    return f"rank {rank}: a collective failed{who} ({first})"
