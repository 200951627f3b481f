"""``cpu_mode()``: megatron-core on the CPU for the extent of a ``with`` block.

megatron-core assumes CUDA in many spots (``device="cuda"`` literals,
``torch.cuda.current_device()``, CUDA RNG trackers, ``param.type()`` string checks). CPU is
a real device for this project (development, tests, the embedded default run), so inside
:func:`cpu_mode` those assumptions are redirected to the CPU; on leaving it every patched
attribute is put back and torch and megatron behave as installed (``torch.zeros(1,
device="cuda")`` raises again on a CPU build). The training runtime holds it from
``initialize`` to ``shutdown`` when it trains on the CPU; nothing of it runs on a GPU.

The redirect is a torch function mode, which ``torch.autograd.backward`` switches off for
the backward pass: training reaches the autograd engine through megatron's direct call
instead (``deallocate_pipeline_outputs``, set in ``training/model_setup.py``), which keeps
it on, and megatron's tensor-parallel autograd functions enter it themselves (for any other
``.backward()``, e.g. in tests). Each shim below says what it patches and why.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from megatron_gr.compat.cpu_rng import CpuRNGStatesTracker
from megatron_gr.compat.cuda_to_cpu import CudaToCpuMode, in_cuda_to_cpu_mode
from megatron_gr.compat.patching import PatchSet

_PATCHES = PatchSet()
_depth = 0  # open cpu_mode() blocks; only the outermost one patches and restores
_mode: Optional[CudaToCpuMode] = None


@contextlib.contextmanager
def cpu_mode() -> Iterator[None]:
    """Runs megatron-core on the CPU inside the block; restores everything on exit.

    Enter it before building models or optimizers, and only when training on the CPU.
    Nested blocks are free: only the outermost one patches on entry and restores on exit.
    Other torch function modes entered inside the block must be left inside it.

    Raises:
        MegatronVersionError: the installed megatron-core lacks an attribute a shim
            patches (nothing stays patched).
    """
    global _depth
    if _depth == 0:
        _enter()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            _leave()


def cpu_mode_active() -> bool:
    return _depth > 0


def _enter() -> None:
    global _mode
    try:
        _patch_torch_cuda_queries(_PATCHES)
        _install_cpu_rng_tracker(_PATCHES)
        _patch_cuda_rng_state_accessors(_PATCHES)
        _run_tensor_parallel_backwards_in_cpu_mode(_PATCHES)
    except BaseException:
        _PATCHES.restore()
        raise
    _mode = CudaToCpuMode()
    _mode.__enter__()


def _leave() -> None:
    global _mode
    mode, _mode = _mode, None
    mode.__exit__(None, None, None)
    _PATCHES.restore()


def _current_device_cpu() -> int:
    return 0


def _nothing_to_wait_for(*args, **kwargs) -> None:
    return None


def _patch_torch_cuda_queries(patches: PatchSet) -> None:
    """Patches: ``torch.cuda.current_device`` (raises on a CPU build; megatron calls it to
    pick allocation devices, which the mode maps back to CPU) and ``torch.cuda.synchronize``
    (called around collectives; nothing to wait for on CPU)."""
    patches.set(torch.cuda, "current_device", _current_device_cpu, purpose="allocate on the CPU")
    patches.set(torch.cuda, "synchronize", _nothing_to_wait_for, purpose="skip CUDA synchronisation on the CPU")


def _keep_cpu_tracker(*args, **kwargs) -> None:
    return None


def _install_cpu_rng_tracker(patches: PatchSet) -> None:
    """Patches: megatron's global RNG tracker (CUDA states) -> :class:`CpuRNGStatesTracker`;
    ``initialize_rng_tracker`` (which would replace it with a CUDA tracker) keeps it."""
    from megatron.core.tensor_parallel import random as mp_random

    purpose = "keep model-parallel RNG states on the CPU"
    patches.set(mp_random, "_CUDA_RNG_STATE_TRACKER", CpuRNGStatesTracker(), purpose=purpose)
    patches.set(mp_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True, purpose=purpose)
    patches.set(mp_random, "initialize_rng_tracker", _keep_cpu_tracker, purpose=purpose)


def _no_cuda_rng_state(*args, **kwargs) -> None:
    return None


def _patch_cuda_rng_state_accessors(patches: PatchSet) -> None:
    """Patches: ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``,
    which activation checkpointing (``checkpoint``, ``CheckpointWithoutOutput``) calls to
    save and replay the RNG state of the recomputed region; they read the CUDA generator.
    On CPU there is none: the CPU generator and the tracker's states, which megatron saves
    beside it, are all the state dropout draws from."""
    from megatron.core.tensor_parallel import random as mp_random

    purpose = "replay recomputed regions without a CUDA generator"
    patches.set(mp_random, "_get_cuda_rng_state", _no_cuda_rng_state, purpose=purpose)
    patches.set(mp_random, "_set_cuda_rng_state", _no_cuda_rng_state, purpose=purpose)


def _run_tensor_parallel_backwards_in_cpu_mode(patches: PatchSet) -> None:
    """Patches: ``backward`` of megatron's tensor-parallel autograd Functions
    (``tensor_parallel.mappings``, ``tensor_parallel.layers``). Autograd does not carry
    Python function modes into backward, so there the CUDA->CPU rewrite is off, and the
    sequence-parallel gathers and reduce-scatters allocate on
    ``torch.cuda.current_device()``, i.e. cuda:0; their backward now runs inside the mode."""
    from megatron.core.tensor_parallel import layers, mappings

    for module in (mappings, layers):
        for cls in list(vars(module).values()):
            if (
                isinstance(cls, type)
                and issubclass(cls, torch.autograd.Function)
                and cls.__module__ == module.__name__
                and "backward" in vars(cls)
            ):
                wrapped = staticmethod(in_cuda_to_cpu_mode(cls.backward))
                patches.set(cls, "backward", wrapped, purpose="run tensor-parallel backward passes on the CPU")
