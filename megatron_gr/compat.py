"""Workarounds for megatron-core 0.16.1, kept in one place.

megatron-core assumes CUDA in many spots (``device="cuda"`` literals,
``torch.cuda.current_device()``, CUDA RNG trackers, ``param.type()`` string checks).
CPU is a real device for this project (development, tests, the embedded default run),
so :func:`enable_cpu_mode` redirects those assumptions to the CPU; none of that runs when
a GPU is used. The redirect is a torch function mode, which ``torch.autograd.backward``
switches off for the backward pass: training reaches the autograd engine through
megatron's direct call instead (``deallocate_pipeline_outputs``, set in model_setup),
which keeps it on, and megatron's tensor-parallel autograd functions enter it themselves
(for any other ``.backward()``, e.g. in tests). The distributed optimizer's reshardable checkpoints need three fixes on
any device (the three functions after ``cpu_mode_active``), and checkpoint saves one more
(``checkpoint_writes_without_manager_process``). Each shim says what it patches and why.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

_CPU_MODE_ACTIVE = False


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # megatron passes torch.cuda.current_device() (an int) as a device; under the shim
    # below that int is 0, which torch would read as cuda:0.
    return isinstance(device, int) and not isinstance(device, bool)


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to CPU.

    Patches: ``torch.zeros(..., device="cuda")`` and every other factory call,
    ``tensor.cuda()``, ``tensor.to("cuda")``; and ``tensor.type()`` answers with the
    CUDA type name, because megatron's optimizers and grad clipping assert
    ``param.type() == 'torch.cuda.FloatTensor'``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """Drop-in for megatron's ``CudaRNGStatesTracker`` that forks the CPU generator.

    Patches: megatron's tensor-parallel init and dropout regions fork named CUDA RNG
    states; on CPU the same named streams are kept as CPU generator states, so
    tensor-parallel ranks draw different dropout masks exactly as they do on GPU.
    """

    def __init__(self):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"rng seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        generator = torch.Generator()
        generator.manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _install_cpu_rng_tracker() -> None:
    """Patches: megatron's global RNG tracker (CUDA states) -> :class:`CpuRNGStatesTracker`."""
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # initialize_rng_tracker() would replace ours with a CUDA tracker; keep ours.
    mp_random.initialize_rng_tracker = lambda *args, **kwargs: None


def _patch_torch_cuda_queries() -> None:
    """Patches: ``torch.cuda.current_device`` (raises on a CPU build; megatron calls it to
    pick allocation devices, which the mode maps back to CPU) and ``torch.cuda.synchronize``
    (called around collectives; nothing to wait for on CPU)."""
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda *args, **kwargs: None


def _patch_cuda_rng_state_accessors() -> None:
    """Patches: ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``,
    which activation checkpointing (``checkpoint``, ``CheckpointWithoutOutput``) calls to
    save and replay the RNG state of the recomputed region; they read the CUDA generator.
    On CPU there is none: the CPU generator and the tracker's states, which megatron saves
    beside it, are all the state dropout draws from."""
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda *args, **kwargs: None
    mp_random._set_cuda_rng_state = lambda *args, **kwargs: None


def _run_tensor_parallel_backwards_in_cpu_mode() -> None:
    """Patches: ``backward`` of megatron's tensor-parallel autograd Functions
    (``tensor_parallel.mappings``, ``tensor_parallel.layers``). Autograd does not carry
    Python function modes into backward, so there the CUDA->CPU rewrite above is off, and
    the sequence-parallel gathers and reduce-scatters allocate on
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
                cls.backward = staticmethod(_in_cpu_mode(cls.backward))


def _in_cpu_mode(backward):
    @functools.wraps(backward)
    def run(ctx, *grads):
        with _CudaToCpuMode():
            return backward(ctx, *grads)

    return run


def enable_cpu_mode() -> None:
    """Make megatron-core run on the CPU in this process (idempotent).

    Call once, before building models or optimizers, and only when training on CPU.
    """
    global _CPU_MODE_ACTIVE
    if _CPU_MODE_ACTIVE:
        return
    _patch_torch_cuda_queries()
    _install_cpu_rng_tracker()
    _patch_cuda_rng_state_accessors()
    _run_tensor_parallel_backwards_in_cpu_mode()
    _CudaToCpuMode().__enter__()  # stays active for the life of the process
    _CPU_MODE_ACTIVE = True


def cpu_mode_active() -> bool:
    return _CPU_MODE_ACTIVE


def allocate_distributed_optimizer_state(optimizer) -> None:
    """Works around (patches nothing): a ``DistributedOptimizer`` that has not stepped yet
    cannot describe its state for loading when the inner optimizer is torch's Adam (no
    apex/TE, any device): ``state_dict()`` reads the Adam ``step`` of every parameter and
    asserts there is exactly one. Megatron's own dummy step (zero gradients) allocates the
    state; loading then overwrites all of it, main weights included."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, DistributedOptimizer) and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


@functools.lru_cache(maxsize=None)
def keep_adam_step_on_reshardable_load() -> None:
    """Patches ``DistributedOptimizer._set_main_param_and_optimizer_states`` (any device,
    once). With torch's Adam every parameter's state holds a ``step`` tensor. Loading the
    ``fully_reshardable`` format, megatron first sets every parameter's ``step`` to one
    shared tensor (restored from the parameter groups), then copies every state key from
    the loaded tensors, which do not hold ``step`` (KeyError). The patched method keeps the
    restored step and gives each parameter its own copy: Adam increments ``step`` in place,
    so a shared tensor would count one step per parameter and skew the bias correction."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
            if "step" in state:
                state["step"] = state["step"].clone()
                tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


@functools.lru_cache(maxsize=None)
def reshardable_state_in_buffer_coordinates() -> None:
    """Patches ``DistributedOptimizer.sharded_param_state_fully_reshardable`` (any device,
    once). It gathers the optimizer state into one tensor per buffer with the padding at the
    end of each bucket removed (``get_parameter_state_dp_zero``), then cuts each parameter
    out at its offset in the padded buffer (``param_index_map``). With more than one bucket
    (a small ``ddp_bucket_size``; the item table's own bucket under pipeline parallelism)
    every later bucket's parameters get another parameter's state (megatron notes the
    symptom as its issue #504). The patched method lays the gathered state out like the
    buffer, padding included, before cutting."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.sharded_param_state_fully_reshardable

    def in_buffer_coordinates(self, state):
        for gbuf_idx, by_dtype in state.items():
            if not isinstance(gbuf_idx, int):
                continue  # the "buckets_coalesced" flag
            buffer = self.buffers[gbuf_idx]
            for world in by_dtype.values():
                for key in ("param", "exp_avg", "exp_avg_sq"):
                    if key not in world:
                        continue
                    padded = world[key].new_zeros(buffer.grad_data.numel())
                    start = 0
                    for bucket in buffer.buckets:
                        padded[bucket.offset : bucket.offset + bucket.numel_unpadded] = world[key][start : start + bucket.numel_unpadded]
                        start += bucket.numel_unpadded
                    world[key] = padded
        return state

    def sharded_param_state(self, *args, **kwargs):
        gather = self.get_parameter_state_dp_zero

        def gather_in_buffer_coordinates(*a, **k):
            state = gather(*a, **k)
            return None if state is None else in_buffer_coordinates(self, state)

        self.get_parameter_state_dp_zero = gather_in_buffer_coordinates
        try:
            return original(self, *args, **kwargs)
        finally:
            del self.get_parameter_state_dp_zero

    DistributedOptimizer.sharded_param_state_fully_reshardable = sharded_param_state


@functools.lru_cache(maxsize=None)
def checkpoint_writes_without_manager_process() -> None:
    """Patches ``dist_checkpointing.strategies.filesystem_async._results_queue`` (any
    device, once). The torch_dist save strategy collects its writers' results in a queue it
    creates, on first use, as ``multiprocessing.get_context("spawn").Manager().Queue()``: a
    server process that imports the whole training program (~430 MB), lives until the
    interpreter exits cleanly and survives a ``kill -9`` or an unhandled SIGTERM of the
    trainer (with the spawn resource tracker beside it). megatron_gr saves synchronously
    (``dist_checkpointing.save``), where the queue is filled and read by the training
    process itself after its forked writers have joined, so an in-process queue does the
    same job without a process. (Megatron's asynchronous save would need the manager;
    megatron_gr does not use it.)"""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def checkpoint_without_output_fp8_arg():
    """``CheckpointWithoutOutput(fp8=False)`` treats any non-None value as "fp8 on" and
    then calls Transformer Engine; pass None unless FP8 is really on."""
    return None


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True
