"""``megatron-gr checkpoint reshard``: a checkpoint rewritten offline as a run of another
parallel layout saves it.

How: the tool spawns a gloo process group of the target layout on the CPU (tensor x
context x pipeline x data ranks on this machine); every rank builds its pipeline stage of the model
from the saved config (the data are not needed: the model type's ``checkpoint_dataset``
stands in), loads the checkpoint with the training loader, and saves it with the training
saver. Why not a single-process rewrite: megatron's torch_dist files store each tensor at
its global shape, so they carry no record of how a layout slices a tensor (which dimension
tensor parallelism splits, which copies are replicas) — only the model built under that
layout knows. Loading and saving through it gives exactly the files, manifest, train state
and per-rank dynamic-table shards that a training run of the target layout writes, checks
everything the training loader checks (checksums, model settings), and costs one process
per target rank, each holding only its own slice.

The output resumes as the source would: same step, data position, optimizer state and
schedule; its train state records the source layout (``resharded_from``) and, as the
random streams of the source ranks do not map onto the new ones, ``fresh_rng``: a run
resuming it seeds them, exactly as a run loading the source under the new layout would.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import yaml

from megatron_gr.checkpoint_tools.source import SavedCheckpoint, open_checkpoint
from megatron_gr.checkpoint_tools.writer import check_new_output
from megatron_gr.config.errors import ConfigError
from megatron_gr.training.checkpoint_errors import CheckpointError
from megatron_gr.training.checkpoint_layout import BEST, CONFIG

_ERRORS = "errors"


def _target_config(checkpoint: SavedCheckpoint, *, tensor: int, pipeline: int, context: int):
    """The saved config with the target layout (raises ConfigError naming what the model's
    shape does not allow, e.g. heads not divisible by the tensor-parallel size)."""
    from megatron_gr.config import ExperimentConfig

    if checkpoint.config is None:
        raise CheckpointError(f"{checkpoint.directory} has no config.yaml: the model cannot be rebuilt to reshard it")
    raw = copy.deepcopy(checkpoint.config)
    parallel = raw.setdefault("parallel", {}) or {}
    raw["parallel"] = parallel
    parallel["tensor_model_parallel_size"] = tensor
    parallel["pipeline_model_parallel_size"] = pipeline
    parallel["context_parallel_size"] = context
    parallel["sequence_parallel"] = bool(parallel.get("sequence_parallel")) and tensor > 1
    for section in ("checkpoint",):
        raw.pop(section, None)
    return ExperimentConfig.from_dict(raw)


# FP8 linears keep nothing in a checkpoint (their amax histories and weight casts stay out
# of it): the tool's ranks build plain linears, which load and save the same tensors.
_FP8_OFF = {"fp8": None, "fp8_recipe": "delayed", "fp8_amax_history_len": 1, "fp8_amax_compute_algo": "most_recent",
            "fp8_margin": 0, "fp8_wgrad": True}


def _build_config(saved):
    """What the tool's ranks build: the target config on the CPU in fp32 (FP8 off), saving
    nothing itself, logging nothing."""
    from megatron_gr.config import ExperimentConfig

    raw = saved.to_dict()
    raw["model"].update(_FP8_OFF)
    raw["training"].update(device="cpu", precision="fp32", kernel_backend="pytorch")
    raw["logging"].update(progress="off", metrics_file=None, tensorboard_dir=None)
    return ExperimentConfig.from_dict(raw)


def _validate_layout(tensor: int, pipeline: int, context: int, data: int) -> None:
    for name, value in (("--tensor-model-parallel-size", tensor), ("--pipeline-model-parallel-size", pipeline),
                        ("--context-parallel-size", context), ("--data-parallel-size", data)):
        if value < 1:
            raise ConfigError(f"{name}={value}: a parallel size is at least 1")


def reshard(source: str | Path, out: str | Path, *, tensor: int, pipeline: int, context: int = 1, data: int = 1,
            dtype: Optional[torch.dtype] = None) -> str:
    """Rewrites the checkpoint ``source`` means under tensor x context x pipeline x data
    ranks into the new directory ``out``; returns a line saying what was written."""
    from megatron_gr.models.registry import get_train_spec
    from megatron_gr.training.plan import make_plan

    out = Path(out)
    _validate_layout(tensor, pipeline, context, data)
    check_new_output(out)
    checkpoint = open_checkpoint(source)
    saved = _target_config(checkpoint, tensor=tensor, pipeline=pipeline, context=context)
    spec = get_train_spec(saved.model.type)
    if spec.checkpoint_dataset is None:
        raise CheckpointError(f"model.type={saved.model.type!r} cannot be rebuilt from a checkpoint alone yet: reshard it by loading it under the new layout in a run")
    world = tensor * context * pipeline * data
    make_plan(_build_config(saved), table_rows=spec.checkpoint_dataset(saved, checkpoint.facts).table_rows(), world_size=world)
    if dtype is None:
        dtype = _saved_weight_dtype(checkpoint)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / _ERRORS).mkdir(parents=True)
    try:
        _spawn(world, {"directory": str(checkpoint.directory), "config": saved.to_dict(), "facts": checkpoint.facts,
                       "out": str(tmp), "dtype": dtype, "best": checkpoint.is_best})
        shutil.rmtree(tmp / _ERRORS)
        (tmp / CONFIG).write_text(yaml.safe_dump(saved.to_dict(), sort_keys=False))
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    which = BEST if checkpoint.is_best else f"step {checkpoint.iteration}"
    cp = f" x context {context}" if context > 1 else ""
    return (f"wrote {out}: {which} of {checkpoint.directory} under tensor {tensor}{cp} x pipeline {pipeline} x data {data} "
            f"({world} ranks)")


def _saved_weight_dtype(checkpoint: SavedCheckpoint) -> Optional[torch.dtype]:
    """The dtype of the saved floating-point weights when it is not fp32 (a bf16 run's)."""
    dtypes = {checkpoint.tensors[key].dtype for key in checkpoint.model_keys() if checkpoint.tensors[key].dtype.is_floating_point}
    return dtypes.pop() if len(dtypes) == 1 and torch.float32 not in dtypes else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# What the ranks' fork server imports once (a fresh interpreter per rank spent ~5 s of CPU
# on these imports: a minute of one core for 8 ranks, on a login node).
_PRELOAD = ["megatron_gr.checkpoint_tools.reshard", "megatron_gr.training.checkpointing",
            "megatron_gr.training.model_setup", "megatron_gr.training.optimizer_setup"]


def _spawn(world: int, job: dict) -> None:
    """Runs :func:`_rank_main` on ``world`` processes forked from a fresh fork server (no
    state of this process reaches them); a failure is one line (the first rank's error)."""
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(_PRELOAD)
    port = _free_port()
    try:
        mp.start_processes(_rank_main, args=(world, port, job), nprocs=world, join=True, start_method="forkserver")
    except mp.ProcessExitedException:
        reports = sorted(Path(job["out"], _ERRORS).glob("rank*.txt"), key=lambda p: p.stat().st_mtime_ns)
        if reports:
            raise CheckpointError(f"reshard failed: {reports[0].read_text().strip()}") from None
        raise CheckpointError("reshard failed: a rank of the target layout exited without a message (out of memory?)") from None


def _rank_main(rank: int, world: int, port: int, job: dict) -> None:
    """One rank of the target layout (a process of the fork server)."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from megatron_gr.training.runtime import shutdown

    try:
        _rewrite(job)
    except BaseException as error:  # noqa: BLE001  (reported as one line by the parent)
        from megatron_gr.config.errors import ConfigError as _ConfigError

        known = isinstance(error, (CheckpointError, _ConfigError))
        line = f"rank {rank}: {error}" if known else f"rank {rank}: {traceback.format_exc().strip().splitlines()[-1]}"
        Path(job["out"], _ERRORS, f"rank{rank}.txt").write_text(line + "\n")
        raise SystemExit(2) from None
    finally:
        shutdown()


def _rewrite(job: dict) -> None:
    """Builds this rank's stage under the target layout, loads the source checkpoint and
    saves it with the training saver."""
    from megatron_gr.config import ExperimentConfig
    from megatron_gr.models.registry import get_train_spec
    from megatron_gr.training import checkpointing
    from megatron_gr.training.model_setup import build_model
    from megatron_gr.training.optimizer_setup import build_optimizer, build_scheduler
    from megatron_gr.training.plan import make_plan
    from megatron_gr.training.runtime import initialize

    saved = ExperimentConfig.from_dict(job["config"])
    directory = Path(job["directory"])
    config = _build_config(saved)
    config = replace(config, checkpoint=replace(config.checkpoint, ckpt_step=None if job["best"] else _step_of(directory)))
    spec = get_train_spec(config.model.type)
    dataset = spec.checkpoint_dataset(config, job["facts"])
    plan = make_plan(config, table_rows=dataset.table_rows())
    runtime = initialize(config.training, tensor_parallel_size=plan.layout.tensor, pipeline_parallel_size=plan.layout.pipeline,
                         context_parallel_size=plan.layout.context)
    model = build_model(plan, spec, dataset)
    quiet = lambda line: None  # noqa: E731  (the parent prints the one result line)
    out = Path(job["out"])
    if job["best"]:
        record = checkpointing.load_best(directory.parent, model, config=config, log=quiet)
        _cast_weights(model, job["dtype"])
        checkpointing.save_best(out, model, record, config=saved)
        return
    optimizer = build_optimizer(config.training, runtime, model)
    scheduler = build_scheduler(config.training, optimizer)
    train_state = checkpointing.load_checkpoint(directory.parent, model, optimizer, scheduler, config=config, log=quiet)
    source_layout = train_state.get("layout")
    train_state = {**train_state, "fresh_rng": True, "resharded_from": source_layout}
    _cast_weights(model, job["dtype"])
    checkpointing.save_checkpoint(out, train_state["iteration"], model, optimizer, scheduler, train_state, config=saved)


def _step_of(directory: Path) -> int:
    return int(directory.name.removeprefix("iter_"))


def _cast_weights(model_chunks, dtype: Optional[torch.dtype]) -> None:
    """Saves the model's floating-point weights in ``dtype`` (the optimizer keeps its fp32
    state): the tool exits after the save, so the weights are replaced, not copied."""
    if dtype is None or dtype == torch.float32:
        return
    from megatron_gr.training.model_setup import unwrap

    for chunk in model_chunks:
        for param in unwrap(chunk).parameters():
            if param.is_floating_point():
                param.data = param.data.to(dtype)
