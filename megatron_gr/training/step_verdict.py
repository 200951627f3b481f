"""Who decides whether a training step moves the weights, and when the host learns it.

A step is skipped when its loss or gradient norm is not finite (``nonfinite.py``) and its
gradients are clipped by the global norm. Decided on the host, every step waits for the
norm: the GPU's queue runs dry while the host reads it, then steps the optimizer, builds
the next batch and launches the next forward, with the GPU idle. Decided on the device,
nothing waits: the clip factor scales the gradients and fused Adam takes the skip flag
as tensors, and the host
reads the step's loss, norm and verdict once they are done, in the next step (the LR
schedule advances then, and a skipped step's dynamic-table step counts go back, before the
next step's optimizer reads them). The dynamic tables' rows take the same clip factor and
skip flag on the device.

:func:`choose_verdict` picks one for the run, the same on every rank: on the device unless
the dense optimizer is one torch's fused Adam cannot step (SGD, a loss scaler).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_gr.compat.optimizer_step import (
    decides_on_device,
    prepare_grads_and_device_norm,
    step_with_device_verdict,
)
from megatron_gr.training.host_copy import HostCopy
from megatron_gr.training.nonfinite import any_rank
from megatron_gr.training.sparse_step import SparseTables


@dataclass
class StepOutcome:
    """A launched optimizer step: ``read()`` gives (updated, gradient norm, [loss sum,
    loss count, tokens]); waits, when the step was decided on the device, until the
    device is done with it."""

    summary: HostCopy  # float64 [5]: loss sum, count, tokens, norm, skipped
    on_skip: Optional[Callable[[], None]] = None  # what a skipped verdict takes back once read

    def read(self) -> tuple[bool, float, list[float]]:
        loss_sum, count, tokens, norm, skipped = self.summary.read().tolist()
        if skipped and self.on_skip is not None:
            self.on_skip()
            self.on_skip = None  # taken back once, however often the outcome is read
        return not skipped, norm, [loss_sum, count, tokens]


class HostVerdict:
    """The step decided on the host: one wait for the gradient norm (and, there, the loss),
    then the dense optimizer and the dynamic tables' rows step together."""

    defers = False  # the outcome is read at launch: nothing is gained by reading it later

    def __init__(self, sparse: SparseTables):
        self.sparse = sparse

    def launch(self, optimizer, totals: torch.Tensor) -> StepOutcome:
        host = {}

        def loss_is_finite() -> bool:  # read where the step waits for its gradient norm anyway
            host["totals"] = totals.tolist()
            loss_sum, count, _ = host["totals"]
            return bool(count) and math.isfinite(loss_sum / count)

        updated, grad_norm = self.sparse.step(optimizer, loss_is_finite=loss_is_finite)  # calls it
        summary = torch.tensor([*host["totals"], grad_norm, float(not updated)], dtype=torch.float64)
        return StepOutcome(HostCopy(summary))


class DeviceVerdict:
    """The step decided on the device: no wait. The norm (dense and the dynamic tables'
    rows together), the clip factor and the skip flag stay tensors (float64 where megatron
    computes in Python floats, so the update is the host-decided one to the bit); the
    gradients' scaling, fused Adam (:func:`step_with_device_verdict`) and the tables' row
    update honour them."""

    defers = True  # the training loop reads each outcome during the next step

    def __init__(self, sparse: SparseTables, device: torch.device):
        self.sparse = sparse
        self.device = device

    def launch(self, optimizer, totals: torch.Tensor) -> StepOutcome:
        norm = self.sparse.joint_norm_on_device(prepare_grads_and_device_norm(optimizer, self.device))
        loss = (totals[0] / totals[1]).reshape(1)  # NaN with no token: skipped
        skip = (~torch.isfinite(loss) | ~torch.isfinite(norm)).float()
        if dist.get_world_size() > 1:  # every rank skips when one does
            dist.all_reduce(skip, op=dist.ReduceOp.MAX)
        skip = skip.reshape(())
        clip = optimizer.config.clip_grad
        # megatron's factor, in float64 as on the host; 1 where megatron would not scale
        coefficient = (clip / (norm + 1.0e-6)).clamp(max=1.0).reshape(()) if clip > 0.0 else None
        lr = optimizer.param_groups[0]["lr"]
        step_with_device_verdict(optimizer, skip=skip, clip_coefficient=coefficient)
        self.sparse.apply_on_device(lr, clip_coefficient=coefficient, skip=skip)
        summary = HostCopy(torch.cat([totals, norm, skip.double().reshape(1)]))
        return StepOutcome(summary, self.sparse.undo_skipped)


def choose_verdict(optimizer, sparse: SparseTables, device: torch.device):
    """:class:`DeviceVerdict` where every rank's optimizer is fused Adam, else
    :class:`HostVerdict` (a collective when several ranks run: call on every rank)."""
    on_host = not decides_on_device(optimizer)
    return HostVerdict(sparse) if any_rank(on_host, device) else DeviceVerdict(sparse, device)
