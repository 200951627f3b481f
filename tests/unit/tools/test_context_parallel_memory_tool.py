"""tools/benchmarks/context_parallel_memory.py on the CPU: a simulated rank of CP = 2 and 4
holds half and a quarter of the activations of one rank (the forward's tensors kept for the
backward), and its step computes the loss of its own tokens; the simulation's patches are
undone afterwards."""

from __future__ import annotations

import argparse

import pytest

from tests.unit.tools.benchmark_tools import load_benchmark


def load_tool():
    return load_benchmark("context_parallel_memory")


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


def test_a_local_window_holds_what_the_full_mask_holds(megatron_cpu):
    """The search's long steps run with a local window: the step keeps the same tensors."""
    tool = load_tool()
    args = argparse.Namespace(device="cpu", model="tiny", num_items=500)
    with tool.simulated_rank("cpu"):
        full = tool.step_memory(args, megatron_cpu, 2, 512)
        windowed = tool.step_memory(args, megatron_cpu, 2, 512, window=32)
    assert windowed["window"] == 32 and windowed["held"] == full["held"]


class FakeGpu:
    """Step memory ``static + per_token L + curve L^2`` (the curve makes the line fitted at
    short lengths predict too far or too short); a step over ``total`` bytes runs out of
    memory."""

    def __init__(self, *, static=3e9, per_token=250e3, curve=0.0, total=80e9, window_extra=0):
        self.static, self.per_token, self.curve, self.total, self.window_extra = static, per_token, curve, total, window_extra
        self.steps = []

    def peak(self, length: int) -> float:
        return self.static + self.per_token * length + self.curve * length**2

    def __call__(self, length: int, window: int) -> dict:
        self.steps.append((length, window))
        peak = self.peak(length) + (self.window_extra if window else 0)
        record = {"length": length, **({"window": window} if window else {})}
        return {**record, "out_of_memory": True} if peak > self.total else {**record, "peak": int(peak)}


@pytest.mark.parametrize("curve", [0.1, -0.03], ids=["line_too_far", "line_too_short"])
def test_the_search_finds_the_longest_history_that_fits(curve):
    import time

    tool = load_tool()
    gpu = FakeGpu(curve=curve)
    rows = tool.longest_length(gpu, cp=2, capacity=78e9, window=1024, limit=None, deadline=time.monotonic() + 60)
    summary, grain = rows[-1], 2048 * 2
    # Between the longest under the capacity (the aim) and the longest that runs at all.
    under_capacity = max(L for L in range(grain, 400_000, grain) if gpu.peak(L) <= 78e9)
    runs = max(L for L in range(grain, 400_000, grain) if gpu.peak(L) <= gpu.total)
    # The points run with the full mask, everything after them with the window.
    assert gpu.steps[:3] == [(16384, 0), (32768, 0), (32768, 1024)]
    assert all(window == 1024 for _, window in gpu.steps[3:])
    assert summary["longest"] % grain == 0 and gpu.peak(summary["longest"]) <= gpu.total
    assert under_capacity - grain <= summary["longest"] <= runs
    assert summary["peak_at_longest"] == int(gpu.peak(summary["longest"]))
    assert summary["bytes_per_token"] == pytest.approx(250e3 + curve * (16384 + 32768), rel=1e-6)
    confirmations = rows[4:-1]
    if curve > 0:  # the prediction runs out of memory, 5% less fits
        assert confirmations[0]["out_of_memory"] and len(confirmations) == 2
    else:  # the prediction fits with room left: the next guesses come closer
        assert len(confirmations) >= 2 and confirmations[-1]["length"] > confirmations[0]["length"]
    assert summary["window_peak_difference"] == 0 and not summary["capped_by_kernel_rows"]
    row = tool.table_row(summary)
    assert row.startswith(f"| 2 | {summary['longest']:,} | ") and row.endswith("| +0.0 MiB |")


def test_the_search_stops_at_the_kernel_limit_and_the_deadline():
    tool = load_tool()
    gpu = FakeGpu(window_extra=2**20)
    rows = tool.longest_length(gpu, cp=1, capacity=78e9, window=512, limit=100_000, deadline=0.0)
    summary = rows[-1]
    assert summary["longest"] == 100_000 // 2048 * 2048 and summary["capped_by_kernel_rows"]
    assert len(gpu.steps) == 4  # past the deadline: the first confirmation only
    assert summary["window_peak_difference"] == 2**20
    assert "(kernel row limit)" in tool.table_row(summary) and tool.table_row(summary).endswith("| +1.0 MiB |")
