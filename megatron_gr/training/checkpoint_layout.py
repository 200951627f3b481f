"""Where checkpoints live under a save directory, and which one ``--load`` means.

Layout::

    iter_0000100/                       one complete checkpoint per saved step
      manifest.json                     size and sha256 of every file, the model's facts
      config.yaml                       the config of the run that saved it
    best/                               model weights of the best validation metric
    latest_checkpointed_iteration.txt   the step ``--load`` resumes from
    config.yaml                         the config of the run writing the directory
    run.lock                            held while a run writes the directory
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_gr.training.checkpoint_errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
BEST = "best"
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
_ITERATION_DIR = re.compile(r"^iter_(\d{7,})$")


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def saved_iterations(root: str | Path) -> list[int]:
    """Steps with an ``iter_*`` directory under ``root`` (renamed into place, so written to
    the end; damaged files are found by the manifest), ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for entry in root.iterdir() if entry.is_dir() and (m := _ITERATION_DIR.match(entry.name))]
    return sorted(steps)


def read_tracker(root: str | Path) -> Optional[int]:
    """The step recorded in the tracker file, or None when there is no tracker file."""
    tracker = Path(root) / TRACKER
    if not tracker.exists():
        return None
    try:
        text = tracker.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        text = None
    except OSError as error:
        raise CheckpointError(f"{tracker} cannot be read ({error.strerror}){previous_hint(root)}") from None
    if text is None or not text.isdigit():
        found = "bytes that are not UTF-8 text" if text is None else repr(text[:40])
        raise CheckpointError(f"{tracker} is corrupt: expected a step number, found {found}{previous_hint(root)}")
    return int(text)


def write_tracker(root: str | Path, iteration: int) -> None:
    """Replaces the tracker file atomically (a killed write leaves the old one)."""
    root = Path(root)
    tmp = root / f".{TRACKER}.tmp"
    tmp.write_text(f"{iteration}\n")
    os.replace(tmp, root / TRACKER)


def previous_hint(root: str | Path, *, before: Optional[int] = None) -> str:
    """``; the previous complete checkpoint is step N: ...`` (or "" when there is none):
    the newest ``iter_*`` directory (below ``before`` when given) whose files are all there."""
    from megatron_gr.training.checkpoint_integrity import looks_complete

    candidates = [s for s in saved_iterations(root) if before is None or s < before]
    for step in reversed(candidates):
        if looks_complete(iteration_dir(root, step)):
            which = "latest" if before is None else "previous"
            return (
                f"; the {which} complete checkpoint is step {step} ({iteration_dir(root, step)}): "
                f"resume from it with --ckpt-step {step}"
            )
    return ""


@dataclass(frozen=True)
class LoadTarget:
    """What ``--load`` resolves to: a checkpoint directory and its step, or nothing to
    resume from (``directory`` None) with the reason to print."""

    directory: Optional[Path]
    iteration: Optional[int]
    notice: Optional[str] = None


def resolve_load(root: str | Path, *, step: Optional[int] = None) -> LoadTarget:
    """The checkpoint ``--load ROOT`` (and ``--ckpt-step``) means.

    A path that does not exist, or a directory with neither checkpoints nor a tracker file,
    is a fresh start (as in Megatron). A directory holding only ``best/`` is a fresh start
    that says ``best/`` is not loaded. A file, a tracker naming a missing step, checkpoints
    without a tracker file, or a ``--ckpt-step`` that was not saved are errors.
    """
    root = Path(root)
    if not root.exists():
        return LoadTarget(None, None, f"checkpoint.load={root} does not exist: starting from scratch")
    if not root.is_dir():
        raise CheckpointError(
            f"checkpoint.load={root} is a file: --load takes the directory a run saved into with --save"
        )
    if step is not None:
        directory = iteration_dir(root, step)
        if not directory.is_dir():
            saved = saved_iterations(root)
            raise CheckpointError(
                f"checkpoint.ckpt_step={step}: {directory} does not exist; saved steps in {root}: "
                f"{', '.join(map(str, saved)) or 'none'}"
            )
        return LoadTarget(directory, step)
    iteration = read_tracker(root)
    saved = saved_iterations(root)
    if iteration is None:
        if saved:
            raise CheckpointError(
                f"{root} holds checkpoints (steps {', '.join(map(str, saved))}) but no {TRACKER}: "
                f"resume from one explicitly with --ckpt-step {saved[-1]}, or start without --load"
            )
        if (root / BEST).is_dir():
            return LoadTarget(
                None, None,
                f"{root} has no {TRACKER} and no iter_* checkpoint, only {BEST}/: starting from scratch "
                f"(fresh weights and optimizer; {BEST}/ is not loaded, and this run's best replaces it when "
                "it saves there)",
            )
        return LoadTarget(None, None, f"no checkpoint in {root}: starting from scratch")
    directory = iteration_dir(root, iteration)
    if not directory.is_dir():
        raise CheckpointError(
            f"{root / TRACKER} names step {iteration} but {directory} does not exist{previous_hint(root, before=iteration)}"
        )
    return LoadTarget(directory, iteration)
