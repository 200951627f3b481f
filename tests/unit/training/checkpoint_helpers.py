"""Helpers for the checkpoint tests: runs of the tiny config, the CLI in-process and in a
subprocess, the weights of a trainer, processes left alive."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import yaml

from megatron_gr.cli import main
from megatron_gr.training.trainer import Trainer
from tests.conftest import REPO_ROOT
from tests.unit.training.helpers import tiny_config

SHORT = {"train_iters": 2, "lr_decay_iters": 2, "lr_warmup_iters": 0}


def saved_run(tmp_path: Path, name: str = "ckpt", **sections) -> Path:
    """A trained tiny run that saved into ``tmp_path / name``; returns that directory."""
    ckpt = tmp_path / name
    sections.setdefault("training", SHORT)
    Trainer(tiny_config(tmp_path / f"{name}-run", checkpoint={"save": str(ckpt)}, **sections)).train()
    return ckpt


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model[0].state_dict().items() if isinstance(v, torch.Tensor)}


def config_file(tmp_path: Path, **sections) -> Path:
    """The tiny config as a YAML file for ``--config``."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, **sections).to_dict(), sort_keys=False))
    return path


def run_cli(capsys, *argv: str) -> tuple[int, list[str], str]:
    """``megatron-gr ARGV`` in this process: (exit code, stderr lines, stdout)."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, err.strip().splitlines(), out


def assert_one_error_line(code: int, err: list[str], *words: str) -> str:
    """Exit code 2 and stderr one ``error:`` line holding every word."""
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for word in words:
        assert word in err[0], (word, err[0])
    return err[0]


def start_cli(tmp_path: Path, *flags: str, training: dict | None = None, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    """``megatron-gr pretrain`` of the tiny config for (nearly) ever, in a subprocess whose
    stdout is read with :func:`wait_for_line`; ``launcher`` goes before ``-m megatron_gr.cli``
    (e.g. torchrun's arguments)."""
    config = config_file(tmp_path, training={"lr_decay_iters": None, "lr_warmup_iters": 0, "train_iters": 100000, **(training or {})})
    command = [sys.executable, *launcher, "-m", "megatron_gr.cli", "pretrain", "--config", str(config), "--progress", "lines", *flags]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    # stderr to a file: an unread pipe could fill up and stall the run
    with open(tmp_path / f"stderr-{time.monotonic_ns()}.txt", "w") as stderr:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=tmp_path)


def wait_for_line(process: subprocess.Popen, text: str, timeout: float = 240.0) -> list[str]:
    """Reads the process's stdout up to a line holding ``text`` (kills it and fails when
    none comes)."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    process.kill()
    raise AssertionError(f"no {text!r} in the output: {lines[-5:]}")


def still_alive(processes: list[psutil.Process], timeout: float = 10.0) -> list[str]:
    """The processes still alive after up to ``timeout`` seconds (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for process in processes:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
