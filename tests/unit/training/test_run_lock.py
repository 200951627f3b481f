"""One run per save directory: a second run stops with one line naming the first; a lock
left by a process that is gone is taken over with a notice; the lock goes away when the run
ends, also after an error."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from megatron_gr.training.checkpoint_errors import CheckpointError
from megatron_gr.training.run_lock import LOCK, RunLock
from megatron_gr.training.trainer import Trainer
from tests.unit.training.checkpoint_helpers import SHORT, assert_one_error_line, config_file, run_cli
from tests.unit.training.helpers import tiny_config


@pytest.fixture
def other_process():
    """A live process of this host that is not us."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process.pid
    process.kill()
    process.wait()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_lock(directory, **holder):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK).write_text(json.dumps({"host": socket.gethostname(), "since": "then", **holder}))


def test_live_holder_refuses(tmp_path, other_process):
    _write_lock(tmp_path, pid=other_process)
    with pytest.raises(CheckpointError, match=rf"being written by another run \(pid {other_process} on {socket.gethostname()}"):
        RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == other_process  # untouched


def test_holder_on_another_host_refuses(tmp_path):
    _write_lock(tmp_path, pid=1, host="elsewhere")
    with pytest.raises(CheckpointError, match="pid 1 on elsewhere"):
        RunLock(tmp_path).acquire()


@pytest.mark.parametrize("holder, reason", [
    (lambda: {"pid": _dead_pid()}, "that process is no longer running"),
    (lambda: {"pid": 123, "host": "node-b", "slurm_job_id": "77"}, "an earlier attempt of this Slurm job"),
    (None, "the lock file is unreadable"),
])
def test_stale_lock_is_taken_over(tmp_path, monkeypatch, holder, reason):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    if holder is None:
        tmp_path.joinpath(LOCK).write_bytes(b"\x00garbage")
    else:
        _write_lock(tmp_path, **holder())
    lock = RunLock(tmp_path)
    notice = lock.acquire()
    assert notice.startswith(f"taking over the lock {tmp_path / LOCK}") and notice.endswith(reason)
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_second_run_stops_with_one_line(megatron_cpu, tmp_path, capsys, other_process):
    save = tmp_path / "ckpt"
    _write_lock(save, pid=other_process)
    (save / "config.yaml").write_text("the other run's config\n")
    path = config_file(tmp_path, training=SHORT)
    code, err, _ = run_cli(capsys, "pretrain", "--config", str(path), "--save", str(save))
    assert_one_error_line(code, err, "is being written by another run", f"pid {other_process}")
    assert (save / "config.yaml").read_text() == "the other run's config\n"  # nothing lost
    assert sorted(p.name for p in save.iterdir()) == ["config.yaml", LOCK]


def test_lock_is_released_after_the_run_and_after_an_error(megatron_cpu, tmp_path, capsys):
    save = tmp_path / "ckpt"
    Trainer(tiny_config(tmp_path, training=SHORT, checkpoint={"save": str(save)})).train()
    assert (save / "iter_0000002").is_dir() and not (save / LOCK).exists()
    (tmp_path / "file").write_text("x")
    path = config_file(tmp_path, training=SHORT)
    code, err, _ = run_cli(capsys, "pretrain", "--config", str(path), "--save", str(save), "--load", str(tmp_path / "file"))
    assert_one_error_line(code, err, "is a file")
    assert not (save / LOCK).exists()
