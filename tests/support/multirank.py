"""The one way tests run code on several gloo ranks: torchrun starts N processes on this
machine, each calls a named function (``"package.module:function"``) with the same payload,
and rank 0's return value comes back. A run that fails or hangs raises
:class:`MultiRankError`: one line naming the function, the world size and the error of the
rank that failed first (not of those that then lost their peer), then the tail of that
rank's traceback and of the launcher's output.

Process starts are the expensive part of a multi-rank test on a CPU: give one launch as much
work as it can carry (several scenarios in one payload).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from tests.support.paths import REPO_ROOT

TIMEOUT_S = 600
_TAIL_LINES = 40


class MultiRankError(AssertionError):
    """A multi-rank run failed; the message's first line says which rank and why."""


def run_ranks(ranks: int, target: str, payload: Any = None, *, workdir: Path, timeout: float = TIMEOUT_S) -> Any:
    """Runs ``target(payload)`` on ``ranks`` gloo ranks and returns what rank 0 returned.

    Args:
        ranks: the world size.
        target: ``"package.module:function"``, importable from the repository root; it runs
            in a started process group (gloo) and may build megatron's parallel state on it.
        payload: any picklable value, the same for every rank.
        workdir: an existing directory for the payload, the result and the ranks' error
            reports (tests put their own files there too).
        timeout: seconds before the whole run is killed and reported as hung.
    """
    workdir = Path(workdir)
    stem = target.replace(":", ".").replace(".", "_") + f"_{ranks}"
    payload_file, result_file = workdir / f"{stem}.payload.pt", workdir / f"{stem}.result.pt"
    errors = workdir / f"{stem}.errors"
    errors.mkdir(exist_ok=True)
    for stale in errors.glob("rank*.txt"):
        stale.unlink()
    torch.save(payload, payload_file)
    result_file.unlink(missing_ok=True)
    argv = ["-m", "tests.support.rank_main", target, str(payload_file), str(result_file), str(errors)]
    run_torchrun(ranks, argv, what=f"{target} on {ranks} ranks", errors=errors, timeout=timeout)
    return torch.load(result_file, weights_only=False)


def run_torchrun(ranks: int, argv: list[str], *, what: str, errors: Path | None = None,
                 timeout: float = TIMEOUT_S) -> str:
    """``torchrun --standalone --nproc-per-node ranks ARGV`` from the repository root (one
    thread per rank); returns its output (stdout and stderr together)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    launcher = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    try:
        output, _ = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(launcher.pid)  # the launcher and every rank
        output, _ = launcher.communicate()
        raise MultiRankError(failure_report(f"{what}: no result after {timeout:.0f} s (killed)", output, errors)) from None
    finally:
        _kill_group(launcher.pid)  # whatever outlived the launcher (checkpoint writers of a failed rank)
    if launcher.returncode != 0:
        raise MultiRankError(failure_report(f"{what}: exit code {launcher.returncode}", output, errors))
    return output


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def failure_report(headline: str, output: str, errors: Path | None) -> str:
    """The message of a failed run: one line (``headline`` and the last error line of the
    rank that failed first), then the tail of that rank's traceback and of the launcher's
    output."""
    sections = []
    # The first report written is the cause: the others are ranks that lost a peer.
    reports = sorted(errors.glob("rank*.txt"), key=lambda p: (p.stat().st_mtime_ns, int(p.stem[4:]))) if errors else []
    if reports:
        first = reports[0]
        trace = first.read_text().rstrip().splitlines()
        headline += f"; {first.stem.replace('rank', 'rank ')}: {trace[-1] if trace else '?'}"
        sections.append(f"--- {first.stem} traceback (tail) ---\n" + "\n".join(trace[-_TAIL_LINES:]))
    sections.append("--- torchrun output (tail) ---\n" + "\n".join(output.rstrip().splitlines()[-_TAIL_LINES:]))
    return "\n".join([headline, *sections])
