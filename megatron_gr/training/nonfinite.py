"""NaN and Inf in training: a step whose loss or gradient norm is not finite moves no weight,
a run that keeps producing them stops, and a non-finite metric never selects weights.

megatron-core 0.16.1 has two checks, neither of which covers these runs: its optimizer skips
a step with non-finite gradients only when a loss scaler is set (``prepare_grads`` returns
``found_inf``: fp16, or bf16 with ``loss_scale``), which the fp32 and bf16 runs here do not
use; DDP's ``check_for_nan_in_grad`` ends the run at the first NaN with a RuntimeError. So the
joint step (:meth:`megatron_gr.training.sparse_step.SparseTables.step`) honours
``prepare_grads``' verdict and adds the loss and the global gradient norm, decided together by
every rank (:func:`any_rank`); :class:`NonFiniteGuard` counts the skipped steps and stops
the run after ``training.max_nonfinite_steps`` of them in a row.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist


class TrainingDivergedError(RuntimeError):
    """Too many non-finite steps in a row: the run stopped. The message is one line."""


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any rank. A collective: every rank of the
    world calls it at the same point. On a single rank the flag is the answer: no
    collective and no device read (on a GPU each is a wait in every step)."""
    if dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], dtype=torch.float32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def is_better(value: float, best: Optional[float]) -> bool:
    """Whether a selection metric ``value`` beats ``best`` (higher is better). A NaN or
    infinite value never does: it must not select (or save) weights as the best."""
    return math.isfinite(value) and (best is None or value > best)


class NonFiniteGuard:
    """Counts skipped (non-finite) steps and stops the run after ``max_in_a_row`` of them in
    a row (0: never stop; every such step is still skipped)."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0

    def observe(self, step: int, record: dict, log) -> bool:
        """Books one step's training ``record`` (it gains ``skipped_steps``, the count so
        far). A skipped step is written to ``log`` (a ``RunLogger``) with a notice whatever
        the log interval. Returns whether the step was skipped.

        Raises:
            TrainingDivergedError: the ``max_in_a_row``-th skipped step in a row (``log`` is
                closed first; the checkpoints already written stay as they are).
        """
        skipped = bool(record["skipped"])
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        self.total += int(skipped)
        record["skipped_steps"] = self.total
        if not skipped:
            return False
        log.train(step, record)
        values = f"loss {_number(record['loss'])}, gradient norm {_number(record['grad_norm'])}"
        if self.max_in_a_row and self.in_a_row >= self.max_in_a_row:
            log.close()
            raise TrainingDivergedError(
                f"training stopped at step {step}: {self.in_a_row} steps in a row had a NaN or "
                f"infinite loss or gradient norm ({values}) and were skipped "
                f"(training.max_nonfinite_steps={self.max_in_a_row}); lower the learning rate "
                "or clip gradients (--clip-grad); checkpoints already saved are kept"
            )
        log.info(
            f"step {step} skipped: {values}; no weight moved ({self.in_a_row} in a row, "
            f"{self.total} in all)"
        )
        return True


def _number(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4g}"
