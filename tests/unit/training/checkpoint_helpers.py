"""Helpers for the checkpoint tests: runs of the tiny config, the CLI in-process, the
weights of a trainer."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from megatron_gr.cli import main
from megatron_gr.training.trainer import Trainer
from tests.unit.training.helpers import tiny_config

SHORT = {"train_iters": 2, "lr_decay_iters": 2, "lr_warmup_iters": 0}


def saved_run(tmp_path: Path, name: str = "ckpt", **sections) -> Path:
    """A trained tiny run that saved into ``tmp_path / name``; returns that directory."""
    ckpt = tmp_path / name
    sections.setdefault("training", SHORT)
    Trainer(tiny_config(tmp_path / f"{name}-run", checkpoint={"save": str(ckpt)}, **sections)).train()
    return ckpt


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model[0].state_dict().items() if isinstance(v, torch.Tensor)}


def config_file(tmp_path: Path, **sections) -> Path:
    """The tiny config as a YAML file for ``--config``."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, **sections).to_dict(), sort_keys=False))
    return path


def run_cli(capsys, *argv: str) -> tuple[int, list[str], str]:
    """``megatron-gr ARGV`` in this process: (exit code, stderr lines, stdout)."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, err.strip().splitlines(), out


def assert_one_error_line(code: int, err: list[str], *words: str) -> str:
    """Exit code 2 and stderr one ``error:`` line holding every word."""
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for word in words:
        assert word in err[0], (word, err[0])
    return err[0]
