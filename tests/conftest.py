"""Shared fixtures: one process-wide megatron setup (gloo, world size 1) for CPU tests."""

from __future__ import annotations

import gc
import os

import pytest
import torch

# Helpers live in tests/support; these names stay importable from here for older imports.
from tests.support.paths import REPO_ROOT, ml100k_dir  # noqa: F401

if not torch.cuda.is_available():
    # Triton kernel tests run in the interpreter without a GPU; it must be on before anything
    # (megatron-core included) imports triton. See tests/triton_support.py.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # Under pytest-xdist (the README's ``-n 2``) each worker is one of the machine's processes:
    # one intra-op thread apiece, or two workers x two threads oversubscribe two cores (the
    # parity tests compare with tolerances, so the thread count does not change what passes).
    if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    if os.environ.get("TRITON_INTERPRET") == "1":
        from tests.triton_support import cache_interpreter_builtin_names

        cache_interpreter_builtin_names()


def pytest_collection_finish(session):
    # Megatron's distributed optimizer runs a full gc.collect() per checkpoint save and load:
    # ~0.3 s each over the objects of every imported module and collected test. Those live
    # for the whole session; frozen, the collector no longer walks them.
    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module", autouse=True)
def _runtime_ends_with_its_module():
    """A Trainer built without a runtime fixture starts one of its own (NCCL on a GPU) and
    leaves it open; the next module's ``megatron_cpu`` would then find an NCCL group and
    refuse. Every module therefore ends with torch.distributed and megatron-core reset."""
    yield
    from megatron_gr.training.runtime import shutdown

    shutdown()


@pytest.fixture(scope="module")
def megatron_cpu():
    """torch.distributed (gloo, one rank) + megatron parallel state, in CPU mode for the
    module's tests only: ``shutdown`` restores torch and megatron-core, so the CPU mode
    never reaches the GPU tests of another module run in the same process."""
    from megatron_gr.config import TrainingConfig
    from megatron_gr.training.runtime import initialize, shutdown

    yield initialize(TrainingConfig(device="cpu", seed=1234))
    shutdown()  # also: an open gloo group delays interpreter exit by about a minute


@pytest.fixture(scope="module")
def megatron_runtime(request):
    """Megatron's parallel state on the device the Triton kernels run on: the GPU, or CPU
    mode (``megatron_cpu``, the kernels in the interpreter) without one."""
    if not torch.cuda.is_available():
        yield request.getfixturevalue("megatron_cpu")
        return
    from megatron_gr.config import TrainingConfig
    from megatron_gr.training.runtime import initialize, shutdown

    yield initialize(TrainingConfig(device="cuda", seed=1234))
    shutdown()
