"""tools/benchmarks/host_overhead.py: its host-read recorder names each read of a tensor
with the line that made it and ignores operators that stay on the device; a tiny run
reports operators, phases and the step's reads (the gradient norm's and the loss's), and with
graphed layers what stays eager around them."""

from __future__ import annotations

import types

import torch

from tests.unit.tools.benchmark_tools import load_benchmark


def _tool() -> types.ModuleType:
    return load_benchmark("host_overhead")


def test_host_reads_are_recorded_with_their_line():
    tool = _tool()
    x = torch.arange(6.0)
    reads = tool.HostReads()
    with reads:
        y = (x * 2).sum()  # stays a tensor: not a read
        float(y)
        y.item()
        x[x > 2].sum()  # boolean indexing: the count of kept elements is read
        bool(x.any())
        torch.nonzero(x)
    kinds = {kind: where for kind, where in reads.counts}
    assert set(kinds) == {"float", "item", "bool-index", "bool", "nonzero"}
    assert all(where.startswith("tools/test_host_overhead.py:") for where in kinds.values()), kinds
    assert sum(reads.counts.values()) == 5


def test_tensors_made_from_host_values_on_a_device_are_recorded():
    tool = _tool()
    reads = tool.HostReads()
    with reads:
        torch.full((), 3, dtype=torch.int, device="cpu")  # a fill: no copy from the host
        torch.tensor(3, dtype=torch.int)  # no device named: made on the host
        torch.tensor(3, dtype=torch.int, device="cpu")  # on a GPU a blocking copy
    assert [kind for kind, _ in reads.counts] == ["tensor-to-device"]
    assert sum(reads.counts.values()) == 1


def _tiny_run(tool, *, graphs: str, python_profile: int = 0) -> dict:
    """The plain variant for 2 steps (1 profiled) on the CPU."""
    from megatron_gr.training.runtime import shutdown

    args = types.SimpleNamespace(warmup=1, steps=2, profile_steps=1, kernel_backend="pytorch", device="cpu",
                                 no_prefetch=True, graphs=graphs, python_profile=python_profile)
    try:
        return tool.measure("plain", args=args)
    finally:
        shutdown()


def test_a_tiny_run_reports_operators_phases_and_reads(tmp_path):
    tool = _tool()
    result = _tiny_run(tool, graphs="none", python_profile=50)
    assert 0 < result["top_level_aten_ops_per_step"] < result["aten_ops_per_step"]
    assert set(result["phase_ms_per_step"]) == {*tool.PHASES, "outside_layers"}
    assert result["phase_ms_per_step"]["forward"] > 0 and result["phase_ms_per_step"]["optimizer"] > 0
    reads = result["host_reads_per_step"]
    # the step is decided on the device: its one read is of its outcome, none of the norm
    assert any(where.startswith("tolist @ megatron_gr/training/step_verdict.py") for where in reads)
    assert not any(where.startswith(("item @ megatron/core/optimizer/clip_grads.py",
                                     "item @ megatron_gr/compat/fast_optimizer.py")) for where in reads), reads
    assert len(result["losses"]) == 2 and all(loss == loss for loss in result["losses"])
    # --python-profile: the step's own function leads (everything runs inside it), by
    # cumulative time, then the functions it calls; only this project's, megatron's, Triton's
    profile = result["python_profile"]
    assert 0 < len(profile) <= 50 and profile[0]["function"].startswith("train_step (megatron_gr/training/trainer.py:")
    assert profile[0]["calls_per_step"] == 1
    times = [row["cumulative_ms_per_step"] for row in profile]
    assert times == sorted(times, reverse=True) and all(row["own_ms_per_step"] <= row["cumulative_ms_per_step"]
                                                        for row in profile)
    assert all(row["function"].split("(", 1)[1].startswith(("megatron_gr/", "megatron/core/", "triton/runtime/"))
               for row in profile)


def test_graphed_layers_are_reported_apart():
    """With ``--graphs layers`` (emulated on the CPU) the layers' replays are their own phase:
    the operators and CPU time outside them are what stays eager, less than the whole step."""
    tool = _tool()
    result = _tiny_run(tool, graphs="layers")
    by_phase = result["top_level_aten_ops_per_step_by_phase"]
    assert by_phase["layers"] > 0 and by_phase["forward"] > 0 and by_phase["optimizer"] > 0
    outside = result["outside_layers_top_level_aten_ops_per_step"]
    assert outside == result["top_level_aten_ops_per_step"] - by_phase["layers"]
    assert 0 < result["phase_cpu_ms_per_step"]["outside_layers"] < sum(
        result["phase_cpu_ms_per_step"][phase] for phase in tool.PHASES
    )
