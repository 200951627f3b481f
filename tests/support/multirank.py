"""The one way tests run code on several gloo ranks: N processes on this machine, each calls
a named function (``"package.module:function"``) with the same payload, and rank 0's return
value comes back. A run that fails or hangs raises :class:`MultiRankError`: one line naming
the function, the world size and the error of the rank that failed first (not of those that
then lost their peer), then the tail of that rank's traceback and of the ranks' output.

The ranks are forked from a fork server that imported torch and megatron once per test
session: a fresh interpreter per rank spent ~5 s of CPU on imports alone, 10 s per 4-rank
launch on two cores. Each rank still is a process of its own, with torchrun's environment
(``tests/unit/parallel/test_cli_torchrun.py`` runs the CLI under torchrun itself). Give one
launch as much work as it can carry all the same (several scenarios in one payload).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tests.support.paths import REPO_ROOT

TIMEOUT_S = 600
_TAIL_LINES = 40
# What the fork server imports once; a rank imports anything else itself.
_PRELOAD = ["tests.support.rank_main", "megatron_gr.training.trainer", "megatron.core.dist_checkpointing"]


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
    _run_forked(ranks, [target, str(payload_file), str(result_file), str(errors)], what=f"{target} on {ranks} ranks",
                errors=errors, timeout=timeout)
    return torch.load(result_file, weights_only=False)


def _fork_server():
    """The forkserver context, its server started with _PRELOAD imported (one thread, as
    torchrun's ranks: OpenMP reads OMP_NUM_THREADS when torch loads)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        from multiprocessing import forkserver

        forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    return context


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_forked(ranks: int, argv: list[str], *, what: str, errors: Path, timeout: float) -> None:
    """``rank_main`` on ``ranks`` forked ranks; as torchrun does, the first rank that fails
    ends the others (they would wait on it until the collectives time out)."""
    from tests.support import rank_main

    context, port = _fork_server(), _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    logs = [errors / f"output{rank}.log" for rank in range(ranks)]
    processes = [context.Process(target=rank_main.forked, args=(rank, ranks, port, env, str(REPO_ROOT), argv, str(logs[rank])))
                 for rank in range(ranks)]
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            process.start()
        while True:
            codes = [process.exitcode for process in processes]
            failed = [code for code in codes if code not in (None, 0)]
            if failed:
                headline = f"{what}: exit code {failed[0]}"
                break
            if all(code == 0 for code in codes):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                headline = f"{what}: no result after {timeout:.0f} s (killed)"
                break
            multiprocessing.connection.wait([p.sentinel for p in processes if p.exitcode is None], timeout=left)
    finally:
        for process in processes:  # the rank and whatever it started (checkpoint writers)
            if process.pid is not None:
                _kill_group(process.pid)
                process.kill()  # a rank killed before it made its group
                process.join()
    raise MultiRankError(failure_report(headline, _ranks_output(logs), errors, launcher="ranks'"))


def _ranks_output(logs: list[Path]) -> str:
    """Every rank's output, its lines prefixed as torchrun prefixes them."""
    lines = []
    for rank, log in enumerate(logs):
        text = log.read_text(errors="replace") if log.exists() else ""
        lines += [f"[rank{rank}]: {line}" for line in text.splitlines()]
    return "\n".join(lines)


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


def failure_report(headline: str, output: str, errors: Path | None, *, launcher: str = "torchrun") -> str:
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
    sections.append(f"--- {launcher} output (tail) ---\n" + "\n".join(output.rstrip().splitlines()[-_TAIL_LINES:]))
    return "\n".join([headline, *sections])
