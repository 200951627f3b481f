"""The CPU mode patches torch and megatron-core only while it is active: leaving it (or
the runtime's ``shutdown``) puts back every attribute it replaced and the device redirect,
and nested entries neither patch twice nor restore early."""

from __future__ import annotations

import pytest
import torch
import torch.overrides
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import layers, mappings
from megatron.core.tensor_parallel import random as mp_random

from megatron_gr.compat import cpu_mode, cpu_mode_active
from megatron_gr.compat.cuda_to_cpu import CudaToCpuMode
from megatron_gr.config import TrainingConfig
from megatron_gr.training.runtime import initialize, shutdown

CUDA_BUILD = torch.cuda.is_available()


def _tensor_parallel_functions() -> list[type]:
    return [
        cls
        for module in (mappings, layers)
        for cls in vars(module).values()
        if isinstance(cls, type) and issubclass(cls, torch.autograd.Function) and cls.__module__ == module.__name__
        and "backward" in vars(cls)
    ]


def _patched_state() -> dict:
    """Everything the CPU mode may replace, as raw entries (a class's own staticmethod
    object, module globals), plus the torch function mode on top of the stack."""
    state = {
        "torch.cuda.current_device": vars(torch.cuda)["current_device"],
        "torch.cuda.synchronize": vars(torch.cuda)["synchronize"],
        "function mode": torch.overrides._get_current_function_mode(),
    }
    for name in ("_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED", "initialize_rng_tracker",
                 "_get_cuda_rng_state", "_set_cuda_rng_state"):
        state[f"random.{name}"] = vars(mp_random)[name]
    for cls in _tensor_parallel_functions():
        state[f"{cls.__qualname__}.backward"] = vars(cls)["backward"]
    return state


def _assert_same(before: dict, after: dict) -> None:
    changed = [name for name in before if before[name] is not after[name]]
    assert not changed, f"not restored: {changed}"


def _assert_plain_torch() -> None:
    """What torch does with a CUDA request without the CPU mode."""
    if CUDA_BUILD:
        assert torch.zeros(1, device="cuda").device.type == "cuda"
    else:
        with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
            torch.zeros(1, device="cuda")
        with pytest.raises((AssertionError, RuntimeError)):
            torch.cuda.current_device()


@pytest.fixture(autouse=True)
def outside_cpu_mode():
    # These tests start from plain torch: no module fixture of this file enters the mode.
    assert not cpu_mode_active(), "a CPU mode is still active from an earlier test module"
    yield
    assert not cpu_mode_active()


def test_cpu_mode_patches_inside_and_restores_everything_on_exit():
    before = _patched_state()
    assert len(_tensor_parallel_functions()) >= 5  # the sequence/tensor-parallel mappings
    with cpu_mode():
        inside = _patched_state()
        assert torch.zeros(1, device="cuda").device.type == "cpu"
        assert torch.ones(2).to("cuda").device.type == "cpu"
        assert torch.cuda.current_device() == 0
        assert isinstance(inside["function mode"], CudaToCpuMode)
        unpatched = [name for name in before if inside[name] is before[name] and "INITIALIZED" not in name]
        assert not unpatched
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"  # megatron's optimizer checks
    _assert_same(before, _patched_state())
    _assert_plain_torch()
    assert torch.zeros(1).type() == "torch.FloatTensor"


def test_nested_entries_patch_once_and_only_the_outermost_exit_restores():
    before = _patched_state()
    with cpu_mode():
        outer = _patched_state()
        with cpu_mode():
            _assert_same(outer, _patched_state())  # no second tracker, no second mode
        _assert_same(outer, _patched_state())
        assert cpu_mode_active()
        assert torch.zeros(1, device="cuda").device.type == "cpu"
    _assert_same(before, _patched_state())


def test_an_exception_inside_the_block_still_restores():
    before = _patched_state()
    with pytest.raises(ValueError, match="inside"):
        with cpu_mode():
            raise ValueError("raised inside")
    _assert_same(before, _patched_state())
    _assert_plain_torch()


def test_rng_tracker_is_cpu_inside_and_fresh_on_each_entry():
    with cpu_mode():
        first = tensor_parallel.get_cuda_rng_tracker()
        first.add("model-parallel-rng", 7)
        with first.fork():
            draw = torch.rand(3)
    with cpu_mode():
        second = tensor_parallel.get_cuda_rng_tracker()
        assert second is not first and not second.get_states()  # nothing carried over
        second.add("model-parallel-rng", 7)
        with second.fork():
            assert torch.equal(torch.rand(3), draw)  # same seed, same stream on the CPU generator


def test_runtime_shutdown_restores_torch_and_megatron():
    before = _patched_state()
    runtime = initialize(TrainingConfig(device="cpu", seed=3))
    try:
        assert runtime.device.type == "cpu" and cpu_mode_active()
        assert torch.zeros(1, device="cuda").device.type == "cpu"
        initialize(TrainingConfig(device="cpu", seed=3))  # as every Trainer does: no second entry
    finally:
        shutdown()
    assert not cpu_mode_active()
    _assert_same(before, _patched_state())
    _assert_plain_torch()
    # and a later run gets a working CPU mode again
    initialize(TrainingConfig(device="cpu", seed=3))
    try:
        with tensor_parallel.get_cuda_rng_tracker().fork():
            torch.rand(1)
    finally:
        shutdown()
    _assert_same(before, _patched_state())
