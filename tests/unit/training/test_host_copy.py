"""A device tensor copied to the host without a wait: the value is the one at the time the
copy was queued, and queuing it makes no synchronising call (a GPU test; on the CPU the
tensor is its own copy)."""

from __future__ import annotations

import warnings

import pytest
import torch

from megatron_gr.training.host_copy import HostCopy


def test_a_cpu_tensor_is_its_own_copy():
    tensor = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert HostCopy(tensor).read() is tensor


@pytest.mark.gpu
def test_gpu_copy_is_queued_without_a_wait_and_keeps_its_value():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    work = torch.randn(4096, 4096, device="cuda")
    value = torch.arange(5, dtype=torch.float64, device="cuda")
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(20):  # a queue the copy must not wait for
                work = work @ work / 4096
            copy = HostCopy(value)
            value.add_(100)  # queued after the copy: not in it
            for _ in range(20):
                work = work @ work / 4096
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert not [w for w in caught if "synchroniz" in str(w.message)]
    assert copy.read().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert copy.read().is_pinned()
