"""Megatron-style command-line flags, each one a shorthand for one ``section.key``."""

from __future__ import annotations

import argparse
from typing import Any

from megatron_gr.config.loader import parse_assignment, parse_value

# flag -> config key. Values are read as YAML scalars and type-checked by the config schema.
FLAG_TO_KEY = {
    # model
    "--num-layers": "model.num_layers",
    "--hidden-size": "model.hidden_size",
    "--num-attention-heads": "model.num_attention_heads",
    "--max-seq-len": "model.max_seq_len",
    "--attention-kernel": "model.attention_kernel",  # deprecated: --kernel-backend
    "--num-residual-streams": "model.num_residual_streams",
    "--fp8-format": "model.fp8",
    "--fp8-recipe": "model.fp8_recipe",
    "--fp8-amax-history-len": "model.fp8_amax_history_len",
    "--fp8-amax-compute-algo": "model.fp8_amax_compute_algo",
    "--fp8-margin": "model.fp8_margin",
    # data
    "--data-path": "data.path",
    "--data-source": "data.source",
    # training
    "--train-iters": "training.train_iters",
    "--micro-batch-size": "training.micro_batch_size",
    "--global-batch-size": "training.global_batch_size",
    "--lr": "training.lr",
    "--min-lr": "training.min_lr",
    "--lr-warmup-iters": "training.lr_warmup_iters",
    "--lr-decay-iters": "training.lr_decay_iters",
    "--lr-decay-style": "training.lr_decay_style",
    "--weight-decay": "training.weight_decay",
    "--clip-grad": "training.clip_grad",
    "--seed": "training.seed",
    "--eval-interval": "training.eval_interval",
    "--eval-batch-size": "training.eval_batch_size",
    "--early-stopping-patience": "training.early_stopping_patience",
    "--exit-interval": "training.exit_interval",
    "--exit-duration-in-mins": "training.exit_duration_in_mins",
    "--distributed-timeout-minutes": "training.distributed_timeout_minutes",
    "--precision": "training.precision",
    "--device": "training.device",
    "--kernel-backend": "training.kernel_backend",
    # parallel
    "--tensor-model-parallel-size": "parallel.tensor_model_parallel_size",
    "--pipeline-model-parallel-size": "parallel.pipeline_model_parallel_size",
    "--context-parallel-size": "parallel.context_parallel_size",
    # checkpoint
    "--save": "checkpoint.save",
    "--load": "checkpoint.load",
    "--save-interval": "checkpoint.save_interval",
    "--ckpt-step": "checkpoint.ckpt_step",
    # logging
    "--log-interval": "logging.log_interval",
    "--metrics-file": "logging.metrics_file",
    "--tensorboard-dir": "logging.tensorboard_dir",
    "--progress": "logging.progress",
}

# Keys that hold file paths: their text is taken as is, never read as YAML.
_PATH_KEYS = {"data.path", "checkpoint.save", "checkpoint.load", "logging.metrics_file", "logging.tensorboard_dir"}

# Flags that set a fixed value.
SWITCHES = {
    "--enable-hyper-connections": ("model.enable_hyper_connections", True),
    "--bf16": ("training.precision", "bf16"),
    "--fp32": ("training.precision", "fp32"),
    "--cpu": ("training.device", "cpu"),
    "--sequence-parallel": ("parallel.sequence_parallel", True),
    "--use-distributed-optimizer": ("parallel.use_distributed_optimizer", True),
    "--overlap-grad-reduce": ("parallel.overlap_grad_reduce", True),
    "--overlap-param-gather": ("parallel.overlap_param_gather", True),
    "--override-opt-param-scheduler": ("checkpoint.override_opt_param_scheduler", True),
    # Megatron's spelling, underscore included.
    "--use-checkpoint-opt_param-scheduler": ("checkpoint.use_checkpoint_opt_param_scheduler", True),
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", metavar="YAML", help="experiment config file (sections model, embeddings, data, training, parallel, checkpoint, logging)")
    group.add_argument(
        "--set",
        dest="assignments",
        metavar="SECTION.KEY=VALUE",
        action="append",
        default=[],
        help="override any config key, e.g. --set model.num_layers=4 (repeatable; applied last)",
    )
    flags = parser.add_argument_group("Megatron-style shorthands (each sets one config key)")
    for flag, key in FLAG_TO_KEY.items():
        flags.add_argument(flag, dest=_dest(flag), metavar="V", default=None, help=f"sets {key}")
    for flag, (key, value) in SWITCHES.items():
        flags.add_argument(flag, dest=_dest(flag), action="store_true", help=f"sets {key}={value}")


def overrides_from_args(args: argparse.Namespace) -> list[tuple[list[str], Any]]:
    """Ordered overrides: shorthand flags first, then ``--set`` in the order given."""
    overrides = []
    for flag, key in FLAG_TO_KEY.items():
        text = getattr(args, _dest(flag))
        if text is not None:
            value = text if key in _PATH_KEYS else parse_value(text)
            overrides.append((key.split("."), value))
    for flag, (key, value) in SWITCHES.items():
        if getattr(args, _dest(flag)):
            overrides.append((key.split("."), value))
    overrides.extend(parse_assignment(expression) for expression in args.assignments)
    return overrides


def _dest(flag: str) -> str:
    return "flag_" + flag.lstrip("-").replace("-", "_")
