"""The checkpoint safety features on GPUs (NCCL): SIGTERM saves and exits 0 with no helper
process left, the saved checkpoint (manifest verified, model compared) resumes; under
torchrun with 2 GPUs, SIGUSR1 forwarded by torchrun stops both ranks after the same step
with a checkpoint, and a hung rank ends the job within the distributed timeout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch

from megatron_gr.training import checkpointing
from megatron_gr.training.checkpoint_integrity import read_manifest, verify
from megatron_gr.training.checkpoint_layout import iteration_dir
from tests.conftest import REPO_ROOT
from tests.unit.training.checkpoint_helpers import config_file, start_cli, still_alive, wait_for_line

pytestmark = pytest.mark.gpu

GPU = ("--device", "cuda")


def test_sigterm_on_a_gpu_saves_and_resumes(tmp_path):
    save = tmp_path / "ckpt"
    process = start_cli(tmp_path, *GPU, "--save", str(save), "--save-interval", "2", "--log-interval", "1")
    wait_for_line(process, "saved checkpoint of step 4")
    children = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-3000:]
    step = checkpointing.latest_iteration(save)
    assert f"SIGTERM received at step {step}: exiting (checkpoint of step {step}" in out
    assert still_alive(children) == []
    verify(iteration_dir(save, step), read_manifest(iteration_dir(save, step)))

    process = start_cli(tmp_path, *GPU, "--save", str(save), "--load", str(save), "--log-interval", "1")
    lines = wait_for_line(process, f"step {step + 1:>6}/")
    assert any(f"resumed from step {step} of {save}" in line for line in lines)
    children = psutil.Process(process.pid).children(recursive=True)
    process.kill()
    process.wait(timeout=60)
    assert still_alive(children) == []


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_torchrun_forwards_sigusr1_and_both_ranks_save(tmp_path, monkeypatch):
    # Recent torch launchers read PET_SIGNALS_TO_HANDLE and overwrite the other with it (as
    # launch/slurm_pretrain.sbatch says); 2.9 reads TORCHELASTIC_SIGNALS_TO_HANDLE: set both.
    monkeypatch.setenv("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    monkeypatch.setenv("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "120")
    save = tmp_path / "ckpt"
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2")
    process = start_cli(tmp_path, *GPU, "--save", str(save), "--save-interval", "2", "--log-interval", "1", launcher=torchrun)
    wait_for_line(process, "saved checkpoint of step 4")
    process.send_signal(signal.SIGUSR1)  # torchrun passes it to both ranks
    out, _ = process.communicate(timeout=300)
    step = checkpointing.latest_iteration(save)
    assert f"SIGUSR1 received at step {step}: exiting (checkpoint of step {step}" in out, out[-3000:]
    verify(iteration_dir(save, step), read_manifest(iteration_dir(save, step)))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_hung_rank_ends_an_nccl_job_within_the_timeout(tmp_path):
    """NCCL's watchdog, not a Python exception, ends the waiting rank: only the time is
    checked (its log names the rank and the collective)."""
    config = config_file(tmp_path, training={"train_iters": 4, "lr_decay_iters": None, "lr_warmup_iters": 0})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = []
    for rank in (0, 1):
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        command = [sys.executable, str(REPO_ROOT / "tests" / "unit" / "training" / "hang_worker.py"), "pretrain",
                   "--config", str(config), *GPU, "--distributed-timeout-minutes", "0.25", "--progress", "off"]
        ranks.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        start = time.monotonic()
        _, err = ranks[0].communicate(timeout=600)
        elapsed = time.monotonic() - start
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    print(err[-2000:])
    assert ranks[0].returncode != 0
    assert elapsed < 180, elapsed  # start-up plus a 15 s timeout, not the 10-minute default
