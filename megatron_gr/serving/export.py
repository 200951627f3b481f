"""``megatron-gr export``: a trained model as a ``torch.export`` program for serving.

    megatron-gr export --config configs/hstu_ml100k.yaml --load runs/ml100k --out hstu.pt2 --top-k 50

Which weights: as ``megatron-gr evaluate`` (``--ckpt-step``, else ``best/``, else the
latest checkpoint), loaded into a one-rank model (a checkpoint of any layout loads). What
the program computes comes from the model type's ``TrainSpec.serving_module`` (retrieval:
``models/retrieval_serving.py``; ranking: ``models/ranking/serving.py``), traced with the
batch and token counts dynamic, with the PyTorch kernel backend (the Triton kernels are not
traceable, and a serving artifact should not need them). The file
loads with ``torch.export.load`` and runs with PyTorch alone (no megatron_gr, no
megatron-core, no Triton); ``megatron_gr.json`` among its extra files says what its inputs and outputs
are and maps table ids back to the data's raw ids.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from megatron_gr.config.errors import ConfigError
from megatron_gr.config.experiment import ExperimentConfig
from megatron_gr.training.checkpoint_errors import CheckpointError

SUFFIX = ".pt2"
METADATA = "megatron_gr.json"


def _serving_model(config: ExperimentConfig) -> ExperimentConfig:
    """``config`` for the model that export traces: one rank, the PyTorch ops (every
    ``kernel_backend`` computes the same function), no CUDA graphs, nothing logged to files."""
    _validate_exportable(config)
    training = dataclasses.replace(config.training, kernel_backend="pytorch", cuda_graphs="none")
    parallel = dataclasses.replace(config.parallel, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                   context_parallel_size=1, sequence_parallel=False)
    logging = dataclasses.replace(config.logging, metrics_file=None, tensorboard_dir=None)
    return dataclasses.replace(config, training=training, parallel=parallel, logging=logging)


def _validate_exportable(config: ExperimentConfig) -> None:
    if config.model.fp8:
        raise ConfigError(
            f"model.fp8={config.model.fp8!r}: exporting an FP8 model is not supported yet (its casts are Triton "
            "kernels, not traceable); export its high-precision weights with --set model.fp8=null"
        )


def export_program(config: ExperimentConfig, *, out: str | Path, top_k: Optional[int] = None) -> str:
    """Exports the saved weights ``config`` points to into ``out`` (a new ``.pt2`` file);
    returns a line saying what was written. ``top_k``: items per user (retrieval; default
    10)."""
    from megatron_gr.compat import traceable_viewless_tensors
    from megatron_gr.training.evaluate_checkpoint import trainer_with_saved_weights
    from megatron_gr.training.model_setup import unwrap

    out = Path(out)
    if out.suffix != SUFFIX:
        raise ConfigError(f"--out {out}: an exported program is a {SUFFIX} file")
    if out.exists():
        raise CheckpointError(f"--out {out} already exists: choose a new path (nothing is overwritten)")
    trainer = trainer_with_saved_weights(_serving_model(config))
    if trainer.spec.serving_module is None:
        raise ConfigError(f"model.type={config.model.type!r} has no serving program yet (TrainSpec.serving_module)")
    model = unwrap(trainer.model[0]).eval()
    try:
        serving = trainer.spec.serving_module(model, **({} if top_k is None else {"top_k": top_k}))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    example = next(iter(trainer.spec.evaluation_batches(trainer.plan, trainer.dataset, "valid", 0, 1)))
    inputs = serving.example_inputs(example.to(trainer.plan.device))
    import torch.fx.experimental._config as fx_config

    # Sizes 0 and 1 are not special cases of the serving computation: trace it for any size.
    with torch.no_grad(), traceable_viewless_tensors(), fx_config.patch(backed_size_oblivious=True):
        program = torch.export.export(serving, tuple(inputs.values()), dynamic_shapes=serving.dynamic_shapes())
    metadata = {
        "model_type": config.model.type,
        "weights_of_step": trainer.state.best_iteration if trainer.state.best_iteration is not None else trainer.state.iteration,
        "inputs": serving.described_inputs(),
        "outputs": serving.described_outputs(),
        "max_seq_len": model.config.max_seq_len,
        **serving.metadata(trainer.dataset),
    }
    tmp = out.parent / f".tmp-{out.name}"
    try:
        torch.export.save(program, tmp, extra_files={METADATA: json.dumps(metadata)})
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    trainer.log.info(f"exported {out}: {config.model.type} {serving.summary()}")
    return str(out)
