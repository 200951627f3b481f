"""A rank of ``test_nonfinite.test_ranks_decide_together`` (spawned; imports torch only)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_gr.training.nonfinite import any_rank


def any_rank_worker(rank: int, init_file: str, flags: list[bool]) -> None:
    """Saves ``[any_rank(flags[rank]), any_rank(False)]`` to ``init_file.<rank>``."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(flags))
    try:
        decisions = [any_rank(flags[rank], torch.device("cpu")), any_rank(False, torch.device("cpu"))]
        torch.save(decisions, f"{init_file}.{rank}")
    finally:
        dist.destroy_process_group()
