"""``megatron-gr export``: a trained model as a ``torch.export`` program for serving.

    megatron-gr export --config configs/hstu_ml100k.yaml --load runs/ml100k --out hstu.pt2 --top-k 50

Which weights: as ``megatron-gr evaluate`` (``--ckpt-step``, else ``best/``, else the
latest checkpoint), loaded into a one-rank model (a checkpoint of any layout loads). What
the program computes comes from the model type's ``TrainSpec.serving_module`` (retrieval:
``models/retrieval_serving.py``), traced with the batch and token counts dynamic. The file
loads with ``torch.export.load`` and runs with PyTorch alone (no megatron_gr, no
megatron-core); ``megatron_gr.json`` among its extra files says what its inputs and outputs
are and maps item ids back to the data's raw ids.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from megatron_gr.config.errors import ConfigError
from megatron_gr.config.experiment import ExperimentConfig
from megatron_gr.training.checkpoint_errors import CheckpointError

SUFFIX = ".pt2"
METADATA = "megatron_gr.json"
_MAX_TOKENS = 1 << 30
_MAX_USERS = 1 << 24


def _one_rank(config: ExperimentConfig) -> ExperimentConfig:
    parallel = dataclasses.replace(config.parallel, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                   context_parallel_size=1, sequence_parallel=False)
    logging = dataclasses.replace(config.logging, metrics_file=None, tensorboard_dir=None)
    return dataclasses.replace(config, parallel=parallel, logging=logging)


def export_program(config: ExperimentConfig, *, out: str | Path, top_k: int = 10) -> str:
    """Exports the saved weights ``config`` points to into ``out`` (a new ``.pt2`` file);
    returns a line saying what was written."""
    from megatron_gr.compat import traceable_viewless_tensors
    from megatron_gr.training.evaluate_checkpoint import trainer_with_saved_weights
    from megatron_gr.training.model_setup import unwrap

    out = Path(out)
    if out.suffix != SUFFIX:
        raise ConfigError(f"--out {out}: an exported program is a {SUFFIX} file")
    if out.exists():
        raise CheckpointError(f"--out {out} already exists: choose a new path (nothing is overwritten)")
    trainer = trainer_with_saved_weights(_one_rank(config))
    if trainer.spec.serving_module is None:
        raise ConfigError(f"model.type={config.model.type!r} has no serving program yet (TrainSpec.serving_module)")
    model = unwrap(trainer.model[0]).eval()
    try:
        serving = trainer.spec.serving_module(model, top_k=top_k)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    example = next(iter(trainer.spec.evaluation_batches(trainer.plan, trainer.dataset, "valid", 0, 1)))
    example = example.to(trainer.plan.device)
    tokens, users = torch.export.Dim("tokens", min=1, max=_MAX_TOKENS), torch.export.Dim("users", min=1, max=_MAX_USERS)
    inputs = {"item_ids": example.item_ids, "timestamps": example.timestamps, "offsets": example.offsets}
    dynamic = {"item_ids": {0: tokens}, "timestamps": {0: tokens}, "offsets": {0: users + 1}}
    described = {"item_ids": "[T] int64 table ids", "timestamps": "[T] int64 seconds", "offsets": "[B + 1] int64"}
    if getattr(serving, "needs_query_times", False):
        # Evaluation queries each history's last token at the held-out target's time.
        inputs["query_times"] = example.query_timestamps[example.offsets[1:] - 1]
        dynamic["query_times"] = {0: users}
        described["query_times"] = "[B] int64 seconds: when each user's recommendation is requested"
    import torch.fx.experimental._config as fx_config

    # Sizes 0 and 1 are not special cases of the serving computation: trace it for any size.
    with torch.no_grad(), traceable_viewless_tensors(), fx_config.patch(backed_size_oblivious=True):
        program = torch.export.export(serving, tuple(inputs.values()), dynamic_shapes=dynamic)
    metadata = {
        "model_type": config.model.type,
        "weights_of_step": trainer.state.best_iteration if trainer.state.best_iteration is not None else trainer.state.iteration,
        "inputs": described,
        "outputs": {"user": "[B, C] float32", "scores": f"[B, {top_k}] float32", "items": f"[B, {top_k}] int64 table ids"},
        "max_seq_len": model.config.max_seq_len,
        "top_k": top_k,
        "raw_item_ids": trainer.dataset.items.vocab.tolist(),
    }
    tmp = out.parent / f".tmp-{out.name}"
    try:
        torch.export.save(program, tmp, extra_files={METADATA: json.dumps(metadata)})
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    trainer.log.info(f"exported {out}: {config.model.type} program, top {top_k} of {serving.corpus_ids.numel()} items")
    return str(out)
