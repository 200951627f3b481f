"""A training step on a GPU waits for the device once: where the optimizer reads the
gradient norm (and, at the same point, the loss). Any other synchronising call (a host
read, a copy from pageable memory) leaves the GPU idle while the host catches up. Counted
with torch's sync debug mode, which reports every synchronising CUDA call by line."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", ["none", "layers"])
def test_gpu_step_waits_for_the_device_only_at_the_gradient_norm(tmp_path, cuda_graphs):
    from megatron_gr.training import trainer as trainer_module
    from megatron_gr.training.device_waits import device_waits
    from megatron_gr.training.trainer import Trainer
    from tests.unit.training.helpers import tiny_config

    config = tiny_config(tmp_path, training={"device": "cuda", "kernel_backend": "triton", "cuda_graphs": cuda_graphs})
    trainer = Trainer(config)
    for _ in range(2):  # compiles and captures
        trainer.train_step()
    sites = device_waits(trainer, steps=3)
    source = Path(trainer_module.__file__).read_text().splitlines()
    # Allowed: the norm's .item() (megatron's gradient norm, fast_optimizer.py) and the loss
    # read in loss_is_finite right after it (the device is idle by then; still reported).
    unexpected = {}
    for (name, line), per_step in sites.items():
        allowed = name == "fast_optimizer.py" or (
            name == "trainer.py" and "loss_is_finite" in "".join(source[max(0, line - 3) : line])
        )
        if not allowed:
            unexpected[f"{name}:{line}"] = per_step
    assert sites, "the sync debug mode reported nothing: the gradient norm's read should show"
    assert not unexpected, f"synchronising calls per step outside the gradient-norm read: {unexpected}"
