"""``megatron-gr evaluate``: valid and test metrics of weights a run saved.

Which weights: the step of ``--ckpt-step`` when given, else ``best/`` (the best validation
weights), else the latest checkpoint. A ``--load`` that does not exist, is a file, or holds
none of them is an error: evaluating freshly initialised weights would print plausible
numbers for no model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megatron_gr.config.errors import ConfigError
from megatron_gr.config.experiment import ExperimentConfig
from megatron_gr.training import checkpointing
from megatron_gr.training.checkpoint_errors import CheckpointError
from megatron_gr.training.checkpoint_layout import BEST, TRACKER, resolve_load


def evaluate_checkpoint(config: ExperimentConfig) -> dict:
    """The final evaluation (valid and test) of the saved weights ``config`` points to."""
    return trainer_with_saved_weights(config).final_evaluation()


def trainer_with_saved_weights(config: ExperimentConfig):
    """A trainer (no save directory, no resume) holding the saved weights ``config``
    points to (see the module docstring), for evaluating or exporting them."""
    from megatron_gr.training.trainer import Trainer

    if not config.checkpoint.load:
        raise ConfigError("evaluate needs a checkpoint directory: pass --load DIR")
    root = Path(config.checkpoint.load)
    if not root.exists():
        raise CheckpointError(f"checkpoint.load={root} does not exist: pass the directory a run saved into with --save")
    use_best = config.checkpoint.ckpt_step is None and (root / BEST).is_dir()
    if not use_best and resolve_load(root, step=config.checkpoint.ckpt_step).directory is None:
        raise CheckpointError(f"{root} holds no weights to evaluate (no {BEST}/, no {TRACKER}, no iter_* checkpoint)")
    # Evaluation writes nothing: no save directory (no lock, no config.yaml), no resume.
    checkpoint = dataclasses.replace(config.checkpoint, load=None, save=None)
    trainer = Trainer(dataclasses.replace(config, checkpoint=checkpoint))
    if use_best:
        record = checkpointing.load_best(root, trainer.model, config=config, log=trainer.log.info)
        trainer.state.best_iteration = record.get("iteration")
        trainer.log.info(f"evaluating {root / BEST} (best validation weights, step {trainer.state.best_iteration})")
    else:
        train_state = checkpointing.load_checkpoint(
            root, trainer.model, trainer.optimizer, trainer.scheduler, config=config, log=trainer.log.info,
            weights_only=True,
        )
        trainer.state.iteration = train_state["iteration"]
        trainer.log.info(f"evaluating the checkpoint of step {trainer.state.iteration} in {root}")
    return trainer
