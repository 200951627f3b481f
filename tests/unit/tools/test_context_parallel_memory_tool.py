"""tools/benchmarks/context_parallel_memory.py on the CPU: a simulated rank of CP = 2 and 4
holds half and a quarter of the activations of one rank (the forward's tensors kept for the
backward), and its step computes the loss of its own tokens; the simulation's patches are
undone afterwards."""

from __future__ import annotations

import argparse
import importlib.util

from tests.conftest import REPO_ROOT


def load_tool():
    path = REPO_ROOT / "tools" / "benchmarks" / "context_parallel_memory.py"
    spec = importlib.util.spec_from_file_location("context_parallel_memory", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_held_activations_fall_with_the_context_parallel_size(megatron_cpu):
    from megatron_gr.transformer import stu_layer
    from megatron_gr.transformer.context_parallel import attention

    tool = load_tool()
    args = argparse.Namespace(device="cpu", model="tiny", num_items=500)
    before = attention.dist, stu_layer.hstu_attention
    with tool.simulated_rank("cpu"):
        held = {cp: tool.step_memory(args, megatron_cpu, cp, 512)["held"] for cp in (1, 2, 4)}
    assert (attention.dist, stu_layer.hstu_attention) == before
    # 512 tokens of a 2-layer model with hidden 64 keep ~9.5 KiB each in fp32.
    assert 4 * 2**20 < held[1] < 6 * 2**20
    assert 0.45 < held[2] / held[1] < 0.56 and 0.2 < held[4] / held[1] < 0.3
