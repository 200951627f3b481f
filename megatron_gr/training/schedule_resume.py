"""The learning-rate schedule of a resumed run, with megatron's semantics made explicit.

megatron's ``OptimizerParamScheduler.load_state_dict`` either keeps the checkpoint's
settings (``use_checkpoint_opt_param_scheduler``), takes the run's
(``override_opt_param_scheduler``), or asserts they are equal. Keeping them silently is what
made a resumed run with a larger ``--train-iters`` train its new steps at learning rate 0
(the old decay had ended). Here:

- ``override``: this run's settings, rebuilt for its ``train_iters``; a notice says so.
- ``use_checkpoint``: the checkpoint's settings; a notice lists what this run asked for
  instead.
- neither (the default): the checkpoint's schedule when the settings are equal, else this
  run's, with a notice saying what changed.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

# state-dict key -> what a user calls it
SETTINGS = {
    "max_lr": "lr",
    "min_lr": "min_lr",
    "lr_warmup_steps": "warm-up steps",
    "lr_decay_steps": "decay steps (lr_decay_iters, or train_iters)",
    "lr_decay_style": "decay style",
    "start_wd": "weight decay",
    "end_wd": "final weight decay",
    "wd_incr_steps": "weight-decay steps",
    "wd_incr_style": "weight-decay style",
}


def schedule_changes(scheduler: OptimizerParamScheduler, saved: dict) -> list[tuple[str, object, object]]:
    """``(name, checkpoint's value, this run's value)`` for each setting that differs (the
    weight-decay length does not count while both runs keep the decay constant)."""
    constant_wd = scheduler.wd_incr_style == "constant" and saved.get("wd_incr_style") == "constant"
    return [
        (name, saved[key], getattr(scheduler, key))
        for key, name in SETTINGS.items()
        if key in saved and saved[key] != getattr(scheduler, key) and not (constant_wd and key == "wd_incr_steps")
    ]


def restore_schedule(
    scheduler: OptimizerParamScheduler, saved: dict, *, override: bool = False, use_checkpoint: bool = False
) -> Optional[str]:
    """Loads ``saved`` (a scheduler state dict) into ``scheduler`` (built from this run's
    settings) under the policy above; returns the notice to print, or None."""
    if override and use_checkpoint:
        raise ValueError("override and use_checkpoint exclude each other")
    changes = schedule_changes(scheduler, saved)
    step = saved.get("num_steps", 0)
    take_ours = override or (bool(changes) and not use_checkpoint)
    scheduler.override_opt_param_scheduler = take_ours
    scheduler.use_checkpoint_opt_param_scheduler = not take_ours
    scheduler.load_state_dict(saved)
    listed = "; ".join(f"{name} {old} -> {new}" for name, old, new in changes)
    if override:
        what = f": {listed}" if changes else " (the same settings as the checkpoint's)"
        return f"LR schedule: this run's settings from step {step} on (--override-opt-param-scheduler){what}"
    if use_checkpoint:
        if not changes:
            return None
        kept = "; ".join(f"{name} {old} (this run: {new})" for name, old, new in changes)
        return f"LR schedule: keeping the checkpoint's (--use-checkpoint-opt_param-scheduler): {kept}"
    if changes:
        return (
            f"LR schedule rebuilt for this run's settings from step {step} on: {listed} "
            "(--use-checkpoint-opt_param-scheduler keeps the checkpoint's)"
        )
    return None
