"""compat.single_rank: megatron's buffer collectives return at once on a group of one rank
when input and output are the same memory, and are megatron's own otherwise; a step with
the shim trains as one without it."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_gr.compat import single_rank
from megatron_gr.compat.single_rank import (
    FinishedWork,
    all_gather_skipping_alone,
    reduce_scatter_skipping_alone,
)
from tests.unit.training.helpers import tiny_config


class Group:
    def __init__(self, size: int):
        self._size = size

    def size(self) -> int:
        return self._size


def _recording(calls: list):
    def original(*args, **kwargs):
        calls.append((args, kwargs))
        return "megatron's"

    return original


def test_alone_with_the_same_memory_does_nothing():
    calls = []
    buffer = torch.arange(8.0)
    reduce_scatter = reduce_scatter_skipping_alone(_recording(calls))
    all_gather = all_gather_skipping_alone(_recording(calls))
    assert reduce_scatter(buffer.view(-1)[0:8], buffer, group=Group(1)) is None
    assert isinstance(reduce_scatter(buffer, buffer, op=dist.ReduceOp.AVG, group=Group(1), async_op=True), FinishedWork)
    assert all_gather(buffer, buffer[:], group=Group(1)) is None
    assert calls == [] and torch.equal(buffer, torch.arange(8.0))


def test_anything_else_is_megatrons_collective():
    calls = []
    buffer = torch.arange(8.0)
    reduce_scatter = reduce_scatter_skipping_alone(_recording(calls))
    all_gather = all_gather_skipping_alone(_recording(calls))
    assert reduce_scatter(buffer[:4], buffer, group=Group(2)) == "megatron's"  # two ranks
    assert reduce_scatter(buffer[:4], buffer, group=Group(1)) == "megatron's"  # another shape
    assert reduce_scatter(buffer, buffer, op=dist.ReduceOp.MAX, group=Group(1)) == "megatron's"
    assert all_gather(buffer, buffer[:4], group=Group(2)) == "megatron's"
    assert all_gather(buffer.clone(), buffer, group=Group(1)) == "megatron's"  # other memory
    assert len(calls) == 5


def test_a_step_trains_as_with_megatrons_collectives(tmp_path, monkeypatch):
    from megatron.core.distributed import param_and_grad_buffer as buffers

    from megatron_gr.training.runtime import shutdown
    from megatron_gr.training.trainer import Trainer

    skips = []
    same_memory = single_rank._same_memory

    def counted(a, b) -> bool:  # on one rank every buffer collective asks, and is skipped
        same = same_memory(a, b)
        skips.append(same)
        return same

    monkeypatch.setattr(single_rank, "_same_memory", counted)

    def run(directory) -> tuple[list[float], str]:
        shutdown()  # the runtime (and its patches) of the next trainer start afresh
        trainer = Trainer(tiny_config(directory))
        result = [trainer.train_step()["loss"] for _ in range(3)]
        reduce_scatter = buffers.dist_reduce_scatter_func.__name__
        trainer.loader.close()
        shutdown()
        return result, reduce_scatter

    skipped, patched = run(tmp_path / "skipped")
    assert skips and all(skips), "the shim skipped no collective"
    monkeypatch.setattr("megatron_gr.compat.fast_optimizer.skip_alone", lambda patches: None)
    skips.clear()
    with_megatrons, original = run(tmp_path / "megatron")
    assert not skips and (patched, original) == ("reduce_scatter", "reduce_scatter_tensor")
    assert with_megatrons == skipped
