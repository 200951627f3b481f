"""Process setup: device, precision, torch.distributed, megatron's parallel state, seeds."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_gr.compat import cpu_mode, fast_optimizer_ops
from megatron_gr.config.errors import ConfigError
from megatron_gr.config.parallel_config import ParallelConfig
from megatron_gr.config.training_config import TrainingConfig
from megatron_gr.seeding import derive_seed
from megatron_gr.training.process_group_check import check_process_group_fits



class _Held:
    """A context entered by initialize() for the life of the runtime and left by shutdown()
    (entered once however often it is asked for)."""

    def __init__(self, enter):
        self._enter, self._stack, self.held = enter, contextlib.ExitStack(), False

    def hold(self, on: bool) -> None:
        if on and not self.held:
            self._stack.enter_context(self._enter())
        elif not on:
            self._stack.close()
        self.held = on


# CPU mode on a CPU device (initialize() on a GPU leaves it); megatron's optimizer helpers on
# torch's for-each kernels. Looked up when entered: tools swap fast_optimizer_ops for a test.
_CPU_MODE = _Held(lambda: cpu_mode())
_OPTIMIZER_OPS = _Held(lambda: fast_optimizer_ops())


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool
    rank: int
    world_size: int

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(training: TrainingConfig) -> torch.device:
    if training.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if training.device == "cuda":
            raise ConfigError("training.device='cuda' but no CUDA GPU is visible: use --device cpu or auto")
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def resolve_bf16(training: TrainingConfig, device: torch.device) -> bool:
    if training.precision == "bf16" and device.type == "cpu":
        raise ConfigError("training.precision='bf16' needs a GPU: the CPU path trains in fp32")
    return training.precision == "bf16" or (training.precision == "auto" and device.type == "cuda")


def initialize(
    training: TrainingConfig,
    *,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    context_parallel_size: int = 1,
) -> Runtime:
    """Starts torch.distributed (gloo on CPU, NCCL on GPU; a one-process group when not
    launched by torchrun), megatron's parallel state and all seeds.

    The data-parallel size is what is left of the world: world / (tensor x context x
    pipeline). A process that is already initialised for another layout (tests running
    several layouts in one process group) gets its parallel state rebuilt. On the CPU it holds
    :func:`megatron_gr.compat.cpu_mode` until :func:`shutdown`.
    """
    device = resolve_device(training)
    bf16 = resolve_bf16(training, device)
    check_process_group_fits(device)  # a gloo group under a CUDA run would crash in the optimizer
    _CPU_MODE.hold(device.type == "cpu")
    _OPTIMIZER_OPS.hold(True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = timedelta(minutes=training.distributed_timeout_minutes)  # a hung rank ends the job
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        else:  # a plain `megatron-gr` run: a one-process group with an in-memory store
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    world = dist.get_world_size()
    layout = ParallelConfig(
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        context_parallel_size=context_parallel_size,
        context_parallel_split_threshold=2 * context_parallel_size,
    )
    layout.data_parallel_size(world)  # raises ConfigError for a world that does not split
    if parallel_state.model_parallel_is_initialized() and (
        parallel_state.get_tensor_model_parallel_world_size() != tensor_parallel_size
        or parallel_state.get_pipeline_model_parallel_world_size() != pipeline_parallel_size
        or parallel_state.get_context_parallel_world_size() != context_parallel_size
    ):
        parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_parallel_size, pipeline_parallel_size, context_parallel_size=context_parallel_size,
            distributed_timeout_minutes=training.distributed_timeout_minutes,
        )
    seed_everything(training.seed, graph_safe=device.type == "cuda" and training.cuda_graphs != "none")
    return Runtime(device=device, bf16=bf16, rank=dist.get_rank(), world_size=world)


def seed_everything(seed: int, *, graph_safe: bool = False) -> None:
    """The process's global generators, from the run seed alone (``megatron_gr.seeding``):
    the same on every rank. What training draws does not come from them: initial values,
    negatives and dropout masks are keyed by name, step and token. They serve megatron's own
    draws (its model-parallel RNG tracker, which gives each tensor-parallel rank its stream)
    and anything a user adds. ``graph_safe``: megatron's RNG tracker keeps CUDA-graph-safe
    generator states (CUDA graphs register them)."""
    process_seed = derive_seed(seed, "process")
    random.seed(process_seed)
    np.random.seed(process_seed % 2**32)
    torch.manual_seed(process_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(
        derive_seed(seed, "megatron") % 2**31, use_cudagraphable_rng=graph_safe, force_reset_rng=graph_safe
    )


def shutdown() -> None:
    """Ends what :func:`initialize` started; torch and megatron-core are as installed again."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _CPU_MODE.hold(False)
    _OPTIMIZER_OPS.hold(False)
