"""Training steps on a GPU, run as the training loop runs them, wait for the device only
where their outcome is read: with the plain table nowhere but at the end, where the last
step's outcome is read (the step is decided on the device); with a dynamic table once a
step, where the optimizer reads the gradient norm (and, at the same point, the loss). Any
other synchronising call (a host read, a copy from pageable memory) leaves the GPU idle
while the host catches up. Counted with torch's sync debug mode, which reports every
synchronising CUDA call by line."""

from __future__ import annotations

from pathlib import Path

import pytest


# A dynamic item table on one rank: its lookups read nothing (the distinct count stays on
# the device); its rows' norm share and scale are read after the norm, the device idle.
DYNAMIC = {"item": {"type": "dynamic", "dynamic": {"capacity": 512, "bucket_size": 16}}}


@pytest.mark.gpu
@pytest.mark.parametrize("table", ["plain", "dynamic"])
@pytest.mark.parametrize("cuda_graphs", ["none", "layers"])
def test_gpu_step_waits_for_the_device_only_at_the_gradient_norm(tmp_path, cuda_graphs, table):
    from megatron_gr.embeddings.dynamic import table as table_module
    from megatron_gr.training import sparse_step, step_verdict
    from megatron_gr.training.device_waits import device_waits
    from megatron_gr.training.trainer import Trainer
    from tests.unit.training.helpers import tiny_config

    config = tiny_config(
        tmp_path, training={"device": "cuda", "kernel_backend": "triton", "cuda_graphs": cuda_graphs},
        embeddings=DYNAMIC if table == "dynamic" else {}, logging={"log_interval": 100},  # the logs read counters
    )
    trainer = Trainer(config)
    for _ in range(2):  # compiles and captures
        trainer.train_step()
    sites = device_waits(trainer, steps=3)
    sources = {
        module.__file__.rsplit("/", 1)[1]: Path(module.__file__).read_text().splitlines()
        for module in (step_verdict, table_module, sparse_step)
    }
    if table == "plain":
        assert isinstance(trainer.verdict, step_verdict.DeviceVerdict)
        # Allowed: the read of the last step's outcome (once in the 3 steps).
        allowed_at = {"step_verdict.py": {"read"}}
    else:
        assert isinstance(trainer.verdict, step_verdict.HostVerdict)
        # Allowed: the norm's .item() (megatron's gradient norm, fast_optimizer.py) and, after
        # it (the device idle by then; still reported), the loss read in loss_is_finite and the
        # dynamic rows' norm share and scale.
        allowed_at = {"step_verdict.py": {"loss_is_finite"}, "sparse_step.py": {"_joint_grad_norm"}, "table.py": {"_host_scale"}}
        assert sites, "the sync debug mode reported nothing: the gradient norm's read should show"
    unexpected = {}
    for (name, line), per_step in sites.items():
        allowed = (table == "dynamic" and name == "fast_optimizer.py") or (
            name in allowed_at and _function_at(sources[name], line) in allowed_at[name]
        )
        if not allowed:
            unexpected[f"{name}:{line}"] = per_step
    assert not unexpected, f"synchronising calls per step outside the outcome's read: {unexpected}"


def _function_at(source: list[str], line: int) -> str:
    """The name of the innermost function that holds 1-based ``line``."""
    for text in reversed(source[:line]):
        if text.lstrip().startswith("def "):
            return text.lstrip()[4:].split("(")[0]
    return ""
