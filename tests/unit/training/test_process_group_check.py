"""A torch.distributed group initialised before the trainer must carry the run's
collectives: a gloo group under a CUDA run (which crashed in megatron's distributed
optimizer with a segmentation fault) or an NCCL group under a CPU run is one ConfigError."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_gr.config.errors import ConfigError
from megatron_gr.training.process_group_check import check_process_group_fits

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


def test_nothing_to_check_without_a_group():  # first: megatron_cpu holds a group for the module
    if dist.is_initialized():
        pytest.skip("this process already holds a group")
    check_process_group_fits(CUDA)


def test_a_gloo_group_refuses_a_cuda_run_and_serves_a_cpu_run(megatron_cpu):
    assert dist.get_backend() == "gloo"
    with pytest.raises(ConfigError, match=r"already initialized with the gloo backend.*run on cuda.*'nccl'"):
        check_process_group_fits(CUDA)
    check_process_group_fits(CPU)


@pytest.mark.parametrize(
    "backend, device, refused",
    [("nccl", CPU, True), ("nccl", CUDA, False), ("cpu:gloo,cuda:nccl", CUDA, False), ("cpu:gloo,cuda:nccl", CPU, False)],
)
def test_backends_against_devices(monkeypatch, backend, device, refused):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    if refused:
        with pytest.raises(ConfigError, match=f"the {backend} backend"):
            check_process_group_fits(device)
    else:
        check_process_group_fits(device)
