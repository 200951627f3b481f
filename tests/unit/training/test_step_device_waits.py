"""Training steps on a GPU, run as the training loop runs them, wait for the device only
where the last step's outcome is read, at the end: the steps are decided on the device
(skip and clipping as tensors; the loop reads each step's outcome during the next), with
the plain table and with a dynamic one. Any other synchronising call (a host read, a copy
from pageable memory) leaves the GPU idle while the host catches up. Counted with torch's
sync debug mode, which reports every synchronising CUDA call by line."""

from __future__ import annotations

from pathlib import Path

import pytest


# A dynamic item table on one rank: its lookups read nothing (the distinct count stays on
# the device), nor does its rows' update (scale and verdict are tensors).
DYNAMIC = {"item": {"type": "dynamic", "dynamic": {"capacity": 512, "bucket_size": 16}}}


@pytest.mark.gpu
@pytest.mark.parametrize("table", ["plain", "dynamic"])
@pytest.mark.parametrize("cuda_graphs", ["none", "layers"])
def test_gpu_steps_wait_for_the_device_only_where_the_last_outcome_is_read(tmp_path, cuda_graphs, table):
    from megatron_gr.training import step_verdict
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
    source = Path(step_verdict.__file__).read_text().splitlines()
    assert isinstance(trainer.verdict, step_verdict.DeviceVerdict)
    unexpected = {}
    for (name, line), per_step in sites.items():
        allowed = name == "step_verdict.py" and _function_at(source, line) == "read"  # the last step's
        if not allowed:
            unexpected[f"{name}:{line}"] = per_step
    assert not unexpected, f"synchronising calls per step outside the outcome's read: {unexpected}"


def _function_at(source: list[str], line: int) -> str:
    """The name of the innermost function that holds 1-based ``line``."""
    for text in reversed(source[:line]):
        if text.lstrip().startswith("def "):
            return text.lstrip()[4:].split("(")[0]
    return ""
