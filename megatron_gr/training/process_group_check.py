"""Refuses a torch.distributed default group that cannot carry the run's collectives.

:func:`megatron_gr.training.runtime.initialize` starts NCCL for a GPU run and gloo for a
CPU run, but keeps a group that a script (or a test) initialised before it. A gloo group
under a CUDA run reaches megatron's distributed optimizer, whose coalesced all-gather of
CUDA parameters on gloo ends the process with a segmentation fault (no Python error); an
NCCL group under a CPU run fails in its first collective. Both are caught here, before
anything is built, as one line.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_gr.config.errors import ConfigError

# the backend each device's collectives need; a combined "cpu:gloo,cuda:nccl" serves both
_BACKEND_FOR = {"cuda": "nccl", "cpu": "gloo"}


def check_process_group_fits(device: torch.device) -> None:
    """Raises ConfigError when torch.distributed is initialised with a single backend that
    cannot run collectives on ``device`` tensors; does nothing when it is not initialised."""
    if not dist.is_initialized():
        return
    backend = str(dist.get_backend())
    needed = _BACKEND_FOR.get(device.type)
    if needed is not None and backend in _BACKEND_FOR.values() and backend != needed:
        raise ConfigError(
            f"torch.distributed is already initialized with the {backend} backend, which cannot run the collectives "
            f"of a run on {device.type} (training.device): initialize it with '{needed}' (or "
            f"'cpu:gloo,cuda:nccl'), or leave it to megatron-gr, which starts the right one"
        )
