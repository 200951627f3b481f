"""tools/benchmarks/reference_step.py: inside ``speedups_off`` a trainer takes megatron's step
(megatron's token-count division, no prefetching, no fused optimizer ops) and trains as the
fast step does (CPU, fp32, a tolerance far above the rounding of the two orders of
operations); after the block trainers are fast again."""

from __future__ import annotations


import pytest
import torch

from tests.unit.tools.benchmark_tools import load_benchmark


@pytest.fixture(scope="module")
def reference_step():
    return load_benchmark("reference_step")


def _run(tmp_path, steps: int = 3):
    from megatron_gr.data.prefetch import PrefetchingStream
    from megatron_gr.training.trainer import Trainer
    from tests.unit.training.helpers import tiny_config

    trainer = Trainer(tiny_config(tmp_path))
    prefetching = isinstance(trainer.loader, PrefetchingStream)
    finalize = trainer.plan.model_config.finalize_model_grads_func
    return [trainer.train_step()["loss"] for _ in range(steps)], prefetching, finalize


def test_reference_step_trains_as_the_fast_step(megatron_cpu, tmp_path, reference_step):
    from megatron.core.distributed import finalize_model_grads

    from megatron_gr.training import runtime

    fast, fast_prefetching, fast_finalize = _run(tmp_path / "fast")
    assert fast_prefetching and fast_finalize is not finalize_model_grads
    with reference_step.speedups_off():
        reference, prefetching, finalize = _run(tmp_path / "reference")
        assert not prefetching and finalize is finalize_model_grads
    assert reference == pytest.approx(fast, rel=1e-4)
    assert not runtime._OPTIMIZER_OPS.held
    again, prefetching, finalize = _run(tmp_path / "again")
    assert prefetching and finalize is not finalize_model_grads and runtime._OPTIMIZER_OPS.held
    assert again == fast
    assert torch.isfinite(torch.tensor(fast)).all()
