"""``megatron-gr``: train, evaluate and inspect configs.

    megatron-gr pretrain                                  # the embedded synthetic default
    megatron-gr pretrain --config configs/hstu_ml100k.yaml --data-path ../shared/data/ml-100k
    megatron-gr evaluate --config ... --load runs/ml100k  # valid/test of the best weights
    megatron-gr show-config --config ... --set model.num_layers=4
    megatron-gr export --config ... --load runs/ml100k --out hstu.pt2   # a torch.export serving program
    megatron-gr checkpoint inspect|convert|reshard|import-gr|export-gr ...   # no training

User mistakes (bad keys, values, files, checkpoints, a megatron-core that lacks what a shim
needs) and a run stopped for non-finite losses print one ``error: ...`` line and exit with
code 2; a collective that fails because another rank hung or died prints one line and exits
with 1; Ctrl-C prints one line and exits with 130. SIGTERM and SIGUSR1 save a checkpoint at
the end of the current step and exit with 0 (``training/exit_conditions.py``).
"""

from __future__ import annotations

import argparse
import sys

import yaml

from megatron_gr.checkpoint_tools import cli as checkpoint_tools
from megatron_gr.compat import MegatronVersionError
from megatron_gr.config import ConfigError, add_config_arguments, overrides_from_args, resolve_config
from megatron_gr.data import DataFormatError, resolve_source
from megatron_gr.data.ranking.source import resolve_ranking_source
from megatron_gr.training.checkpoint_errors import CheckpointError
from megatron_gr.training.distributed_failure import DistributedFailure
from megatron_gr.training.nonfinite import TrainingDivergedError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-gr", description="Generative recommenders on megatron-core.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("pretrain", "train a model (the embedded synthetic HSTU when no config is given)"),
        ("evaluate", "evaluate the best (or latest) weights of --load on the valid and test splits"),
        ("show-config", "print the resolved config as YAML and exit"),
        ("export", "write a torch.export program of the saved weights of --load for serving"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        add_config_arguments(command)
        if name == "export":
            command.add_argument("--out", required=True, help="the program file to write (.pt2)")
            command.add_argument("--top-k", type=int, default=None,
                                 help="retrieval: items the program returns per user (default 10)")
    checkpoint_tools.add_parser(commands)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "checkpoint":
        return checkpoint_tools.run(args)
    config = resolve_config(args.config, overrides_from_args(args))
    if args.command == "show-config":
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        if config.data.source == "auto":
            print(_auto_source_comment(config))
        return 0
    from megatron_gr.training import distributed_failure
    from megatron_gr.training.evaluate_checkpoint import evaluate_checkpoint
    from megatron_gr.training.run_lock import release_all
    from megatron_gr.training.runtime import shutdown
    from megatron_gr.training.trainer import Trainer

    try:
        if args.command == "pretrain":
            Trainer(config).train()
        elif args.command == "export":
            from megatron_gr.serving import export_program

            export_program(config, out=args.out, top_k=args.top_k)
        else:
            evaluate_checkpoint(config)
    except RuntimeError as error:
        # Described while the process group exists (the description asks the other ranks).
        message = distributed_failure.describe(error, timeout_minutes=config.training.distributed_timeout_minutes)
        if message is None:
            raise
        raise DistributedFailure(message) from None
    finally:
        release_all()
        shutdown()
    return 0


def _auto_source_comment(config) -> str:
    """A YAML comment saying which source ``data.source: auto`` stands for (or why none)."""
    resolve = resolve_ranking_source if config.model.type == "ranking" else resolve_source
    try:
        return f"# data.source auto -> {resolve('auto', config.data.path)}"
    except (DataFormatError, FileNotFoundError) as error:
        return f"# data.source auto -> unresolved: {error}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (
        ConfigError, DataFormatError, CheckpointError, FileNotFoundError, TrainingDivergedError, MegatronVersionError
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except DistributedFailure as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "interrupted (Ctrl-C): stopped at once without saving; complete checkpoints already saved are kept "
            "(SIGTERM or SIGUSR1 save first)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
