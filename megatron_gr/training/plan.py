"""The run plan: every decision that needs the world size, the device or the data, made and
checked once, before anything is built.

``make_plan`` turns a validated :class:`ExperimentConfig` plus the facts of the launch (the
world size, the visible devices, the installed packages) and of the data into a frozen
:class:`RunPlan`: the device and precision, the parallel layout, the batch arithmetic, the
kernel backend, the filled model config and the seed. Anything a user can get wrong is
rejected here with one line naming the setting; the builders that follow take the plan
and cannot fail on user input.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_gr.compat import transformer_engine_available
from megatron_gr.config.errors import ConfigError
from megatron_gr.config.experiment import MODEL_FIELDS, ExperimentConfig
from megatron_gr.config.transformer_config import GRTransformerConfig
from megatron_gr.ops.backend import KernelBackend, resolve_backend
from megatron_gr.training.runtime import resolve_bf16, resolve_device
from megatron_gr.transformer.fp8 import check_fp8_runnable


@dataclass(frozen=True)
class ParallelLayout:
    """How the world is split; the degrees multiply to the world size."""

    world_size: int
    tensor: int
    pipeline: int
    data: int
    sequence_parallel: bool
    context: int = 1


@dataclass(frozen=True)
class RunPlan:
    config: ExperimentConfig
    device: torch.device
    bf16: bool
    backend: KernelBackend
    layout: ParallelLayout
    global_batch_size: int
    """Sequences per optimizer step over all data-parallel ranks."""
    micro_batches_per_rank: int
    """Micro-batches each data-parallel rank accumulates per step."""
    micro_batch_balance: str
    """How a global batch is cut into micro-batches: ``attention_cost`` or ``none``."""
    model_config: GRTransformerConfig
    """The model section with the fields owned by other sections filled in; the only
    model config the run builds."""
    seed: int

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


def launch_world_size() -> int:
    """Processes of this launch: the initialised group's, torchrun's ``WORLD_SIZE``, or 1."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_plan(
    config: ExperimentConfig,
    *,
    num_items: Optional[int] = None,
    table_rows: Optional[dict[str, int]] = None,
    world_size: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> RunPlan:
    """Resolves and checks every run-level decision (raises ConfigError, one line).

    ``table_rows``: the rows each plain table needs for the data, when it is known
    (``Dataset.table_rows``); ``num_items`` is short for ``{"item": num_items + 1}``.
    ``world_size`` and ``device`` are facts of the launch, found when not given (tests give
    them to plan for other machines).
    """
    training, parallel = config.training, config.parallel
    if device is None:
        device = resolve_device(training)
    bf16 = resolve_bf16(training, device)
    try:
        backend = resolve_backend(training.kernel_backend, device)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    backend = _backend_for_model(config, backend)
    world = launch_world_size() if world_size is None else world_size
    data_parallel = parallel.data_parallel_size(world)  # ConfigError when the world does not split
    layout = ParallelLayout(
        world_size=world,
        tensor=parallel.tensor_model_parallel_size,
        pipeline=parallel.pipeline_model_parallel_size,
        data=data_parallel,
        sequence_parallel=parallel.sequence_parallel,
        context=parallel.context_parallel_size,
    )
    global_batch, per_rank = _batch_arithmetic(config, data_parallel)
    if num_items is not None:
        table_rows = {"item": num_items + 1, **(table_rows or {})}
    _check_table_rows(config, table_rows or {})
    _check_cuda_graphs(config, device, backend, layout)
    _check_output_paths(config)
    model_config = _model_config(config, layout, bf16)
    check_fp8_runnable(model_config, device)  # FP8 is an error where it cannot run, never a no-op
    return RunPlan(
        config=config,
        device=device,
        bf16=bf16,
        backend=backend,
        layout=layout,
        global_batch_size=global_batch,
        micro_batches_per_rank=per_rank,
        micro_batch_balance=parallel.balance_for(data_parallel),
        model_config=model_config,
        seed=training.seed,
    )


def _batch_arithmetic(config: ExperimentConfig, data_parallel: int) -> tuple[int, int]:
    training = config.training
    per_step = training.micro_batch_size * data_parallel
    global_batch = training.global_batch_size or per_step
    if global_batch % per_step != 0:
        raise ConfigError(
            f"training.global_batch_size={global_batch} must be a multiple of micro_batch_size "
            f"x data-parallel size = {training.micro_batch_size} x {data_parallel}"
        )
    return global_batch, global_batch // per_step


def _model_config(config: ExperimentConfig, layout: ParallelLayout, bf16: bool) -> GRTransformerConfig:
    """The model section, built once with the fields other sections own."""
    model = config.model
    dtype = torch.bfloat16 if bf16 else torch.float32
    return GRTransformerConfig(
        **{name: getattr(model, name) for name in MODEL_FIELDS},
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        sequence_parallel=layout.sequence_parallel,
        context_parallel_size=layout.context,
        context_parallel_split_threshold=config.parallel.context_parallel_split_threshold,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        # Weights drawn on the CPU from one generator and then split: the same model under
        # every tensor-parallel size, and on CPU and GPU.
        use_cpu_initialization=True,
        # Jagged micro-batches hold different token counts: normalise the loss by tokens.
        calculate_per_token_loss=True,
        # Pipeline stages exchange variable-length tensors (megatron only accepts this flag
        # together with the all-to-all MoE dispatcher, even for dense models).
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
        # Free each stage's sent activations (only their autograd graph is kept) and run
        # the backward pass through megatron's direct call into the autograd engine. On the
        # CPU that direct call also keeps the compat device redirect active in backward
        # (``torch.autograd.backward`` would switch it off: see compat).
        deallocate_pipeline_outputs=True,
    )


def _backend_for_model(config: ExperimentConfig, backend: KernelBackend) -> KernelBackend:
    """The backend, unless the model needs what only the PyTorch ops do: then ``auto``
    resolves to PyTorch and an explicit ``triton`` is an error."""
    model = config.model
    query_bias = model.block_type == "stu" and model.relative_attention_bias and model.time_bias_origin == "query"
    if not (query_bias and backend is KernelBackend.TRITON):
        return backend
    if config.training.kernel_backend == "auto":
        return KernelBackend.PYTORCH
    raise ConfigError(
        "model.time_bias_origin='query' needs the PyTorch attention (the Triton kernel buckets |ts_i - ts_j| "
        "only): set --kernel-backend pytorch (or auto) or model.time_bias_origin=token"
    )


def _check_table_rows(config: ExperimentConfig, table_rows: dict[str, int]) -> None:
    for name, rows in table_rows.items():
        table = config.embeddings.get(name)
        if table is not None and table.type == "plain" and table.num_embeddings is not None and table.num_embeddings < rows:
            raise ConfigError(
                f"embeddings.{name}.num_embeddings={table.num_embeddings} is too small for {rows - 1} items "
                f"(the data's distinct ids, plus the padding row): use >= {rows} or leave it unset"
            )


def _check_cuda_graphs(
    config: ExperimentConfig, device: torch.device, backend: KernelBackend, layout: ParallelLayout
) -> None:
    """``training.cuda_graphs`` where graphs can capture the layers (``training/cuda_graphs.py``)."""
    mode = config.training.cuda_graphs
    if mode == "none":
        return
    key = f"training.cuda_graphs={mode!r}"
    model = config.model
    if device.type != "cuda":
        raise ConfigError(f"{key} needs a CUDA GPU (this run trains on the CPU): use training.cuda_graphs=none")
    if backend is not KernelBackend.TRITON:
        raise ConfigError(
            f"{key} needs the Triton kernels (training.kernel_backend=triton or auto): the PyTorch reference "
            "attention reads sequence lengths on the host, which a graph cannot replay"
        )
    if model.recompute_granularity == "full" or model.recompute_mhc:
        what = "full-layer recompute" if model.recompute_granularity == "full" else "mHC recompute (recompute_modules: [mhc])"
        raise ConfigError(
            f"{key} does not capture recomputed layers yet ({what}): turn recompute off "
            "or use training.cuda_graphs=none"
        )
    if layout.context > 1:
        raise ConfigError(
            f"{key} does not capture context-parallel layers (parallel.context_parallel_size={layout.context}: "
            "their key exchange and per-batch layouts change with every batch): use training.cuda_graphs=none "
            "or context_parallel_size=1"
        )
    if model.fp8 and transformer_engine_available():
        raise ConfigError(
            f"{key} does not capture Transformer Engine's FP8 linears (model.fp8={model.fp8!r} with TE installed: "
            "their scales and weight casts live in TE's autocast, outside the layers): use training.cuda_graphs=none "
            "or the native FP8 linears (uninstall transformer_engine)"
        )
    if model.type != "retrieval":
        raise ConfigError(
            f"{key} captures the retrieval model's layers only (model.type={model.type!r}: ranking batches "
            "carry per-request candidates the graph buckets do not pad): use training.cuda_graphs=none"
        )
    if model.block_type != "stu":
        raise ConfigError(
            f"{key} captures STU layers only (model.block_type={model.block_type!r}): use model.block_type=stu "
            "or training.cuda_graphs=none"
        )
    if mode == "step" and layout.pipeline > 1:
        raise ConfigError(
            f"{key} captures the whole stage as one graph, which pipeline parallelism feeds through its own "
            f"input (pipeline_model_parallel_size={layout.pipeline}): use training.cuda_graphs=layers"
        )


def _check_output_paths(config: ExperimentConfig) -> None:
    """Outputs that cannot be written stop the run now, not at the first save after the
    training they were meant to keep."""
    targets = (
        ("checkpoint.save", config.checkpoint.save, "directory"),
        ("logging.tensorboard_dir", config.logging.tensorboard_dir, "directory"),
        ("logging.metrics_file", config.logging.metrics_file, "file"),
    )
    for key, value, kind in targets:
        if value:
            problem = _unwritable(Path(value), kind)
            if problem:
                raise ConfigError(f"{key}={value!r} cannot be written: {problem}")


def _unwritable(path: Path, kind: str) -> Optional[str]:
    """Why ``path`` (a directory or a file to create or append to) cannot be written, or
    None. Tries a real write in the nearest existing directory: permission bits do not tell
    (root ignores them; read-only mounts do not show in them)."""
    if kind == "directory" and path.exists() and not path.is_dir():
        return "a file is in the way (a directory is needed)"
    if kind == "file" and path.is_dir():
        return "it is a directory (a file is needed)"
    existing = path if (kind == "directory" and path.is_dir()) else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".megatron_gr-write-check-"):
            pass
    except OSError as error:
        return f"{existing} is not writable ({error.strerror or error})"
    return None
