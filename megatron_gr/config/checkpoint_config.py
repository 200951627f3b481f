"""Saving and resuming."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_gr.config.validation import check_int_range, require


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    """Directory for checkpoints (``iter_XXXXXXX/``, ``best/`` and the tracker file)."""

    load: Optional[str] = None
    """Directory to resume from (the step its tracker file names). A path that does not
    exist, or a directory without checkpoints, starts a fresh run with a notice, as in
    Megatron; a file is an error. The model settings saved beside the checkpoint must match
    this run's (one error line names each field that differs)."""

    ckpt_step: Optional[int] = None
    """Load ``iter_<ckpt_step>/`` of ``load`` instead of the step its tracker file names
    (e.g. the previous complete checkpoint when the latest is damaged). For one start only:
    a restarted job that keeps the flag loads that step again (as Megatron's)."""

    override_opt_param_scheduler: bool = False
    """On resume, use this run's learning-rate and weight-decay schedule (lr, min_lr,
    warm-up, decay length and style), rebuilt for its ``train_iters``, and print what it
    replaces (Megatron's ``--override-opt-param-scheduler``). Without either flag the
    schedule is rebuilt only when the settings differ, with a notice saying what changed."""

    use_checkpoint_opt_param_scheduler: bool = False
    """On resume, keep the checkpoint's schedule even where this run's settings differ (a
    notice lists them; steps past the saved decay length train at min_lr), as Megatron's
    ``--use-checkpoint-opt_param-scheduler``."""

    save_interval: Optional[int] = None
    """Save every N steps; None = only at the end (and the best checkpoint)."""

    keep_best: bool = True
    """With ``save``, keep the checkpoint of the best validation NDCG@10 under ``best/``; the
    final test evaluation uses it."""

    def __post_init__(self):
        if self.save_interval is not None:
            check_int_range("save_interval", self.save_interval, low=1)
        if self.ckpt_step is not None:
            check_int_range("ckpt_step", self.ckpt_step, low=0)
        require(
            not (self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler),
            "checkpoint.override_opt_param_scheduler and checkpoint.use_checkpoint_opt_param_scheduler "
            "are both true: choose one (this run's schedule or the checkpoint's)",
        )
