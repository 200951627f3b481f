"""One of two gloo ranks (started through the multi-rank harness by test_device_norm.py):
the gradient norm left on the device issues megatron's collectives on every rank, whatever
gradients this rank holds, and sums what megatron's norm sums."""

from __future__ import annotations

import json
import types
from pathlib import Path


def _part(grads, group=None):
    return types.SimpleNamespace(get_main_grads_for_grad_norm=lambda: grads,
                                 get_grad_stats_parallel_group=lambda: group, is_stub_optimizer=not grads)


def norms(directory: str) -> None:
    """Writes ``DIR/norms<rank>.json``: the norms of three chained optimizers."""
    import torch
    import torch.distributed as dist

    from megatron_gr.compat.optimizer_step import prepare_grads_and_device_norm

    rank = dist.get_rank()
    ones = [torch.ones(4)]  # square 4 per part that holds it
    cases = {
        # shared group, rank 1 holds no gradient (a shard of padding, a stub part): one all-reduce
        "shared_one_empty": ([_part(ones), _part(ones if rank == 0 else [])], True),
        # groups not shared: one all-reduce per part, stubs included
        "per_part": ([_part(ones), _part([] if rank == 0 else ones, group=dist.group.WORLD)], False),
        "single": ([_part(ones if rank == 1 else [])], True),
    }
    report = {}
    for name, (parts, shared) in cases.items():
        optimizer = types.SimpleNamespace(
            chained_optimizers=parts, prepare_grads=lambda: False,
            grads_states_parallel_group_is_shared=lambda shared=shared: shared,
        )
        report[name] = float(prepare_grads_and_device_norm(optimizer, torch.device("cpu")))
        flag = torch.zeros(1)
        dist.all_reduce(flag)  # what comes next (the skip flag's all-reduce) meets the same collective
    Path(directory, f"norms{rank}.json").write_text(json.dumps(report))
