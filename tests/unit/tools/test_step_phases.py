"""tools/benchmarks/step_phases.py: kernels of a hand-written chrome trace sorted into phases."""

from __future__ import annotations


import pytest

from tests.unit.tools.benchmark_tools import load_benchmark


@pytest.fixture(scope="module")
def phases():
    return load_benchmark("step_phases")


def _range(name, ts, dur, tid=1, cat="cpu_op", seq=None):
    args = {} if seq is None else {"Sequence number": seq}
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}


def _kernel(name, ts, dur, corr, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": 7, "args": {"correlation": corr}}


def _launch(ts, corr, tid=1):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "tid": tid,
            "args": {"correlation": corr}}


def test_kernels_go_to_annotations_names_and_backward_of_annotated_forward_ops(phases):
    events = [
        # forward: the loss annotation holds an op (sequence number 5) launching a reduction
        _range("e2e::loss", 0, 100, cat="user_annotation"),
        _range("aten::logsumexp", 10, 20, seq=5),
        _launch(12, 1), _kernel("reduce_kernel", 200, 10, 1),
        # an attention kernel launched outside any annotation
        _launch(110, 2), _kernel("hstu_fwd_kernel", 220, 40, 2),
        # a GEMM and a plain elementwise kernel
        _launch(120, 3), _kernel("sm90_xmma_gemm_bf16", 260, 30, 3),
        _launch(130, 4), _kernel("vectorized_elementwise_kernel", 290, 5, 4),
        # backward thread: the node of sequence number 5 launches an elementwise kernel -> loss
        _range("autograd::engine::evaluate_function: LogsumexpBackward0", 300, 50, tid=2, seq=5),
        _launch(310, 5, tid=2), _kernel("vectorized_elementwise_kernel", 400, 8, 5),
        _range("autograd::engine::evaluate_function: _HSTUAttentionBackward", 360, 30, tid=2, seq=9),
        _launch(365, 6, tid=2), _kernel("hstu_bwd_dq_kernel", 410, 60, 6),
        # optimizer annotation wins over the kernel's name
        _range("e2e::optimizer", 500, 100, cat="user_annotation"),
        _launch(510, 7), _kernel("sm90_xmma_gemm_like_name", 600, 12, 7),
        _kernel("Memcpy HtoD", 620, 3, 99, cat="gpu_memcpy"),
    ]
    result = phases.phase_breakdown({"traceEvents": events}, num_steps=1)
    ms = result["phases_ms"]
    assert ms["loss"] == pytest.approx((10 + 8) / 1e3)
    assert ms["attention_forward"] == pytest.approx(40 / 1e3)
    assert ms["attention_backward"] == pytest.approx(60 / 1e3)
    assert ms["gemm"] == pytest.approx(30 / 1e3)
    assert ms["norms_and_elementwise"] == pytest.approx(5 / 1e3)
    assert ms["optimizer"] == pytest.approx(12 / 1e3)
    assert ms["copies"] == pytest.approx(3 / 1e3)
    # busy: kernels [200,210] [220,260] [260,290] [290,295] [400,408] [410,470] [600,612] [620,623]
    assert result["gpu_busy_ms"] == pytest.approx((10 + 40 + 30 + 5 + 8 + 60 + 12 + 3) / 1e3)
    assert result["kernels_per_step"] == 7


def test_overlapping_kernels_count_once_in_busy_time_and_steps_divide(phases):
    events = [_launch(0, 1), _kernel("a", 0, 10, 1), _launch(1, 2), _kernel("b", 5, 10, 2)]
    result = phases.phase_breakdown({"traceEvents": events}, num_steps=2)
    assert result["gpu_busy_ms"] == pytest.approx(15 / 1e3 / 2)
    assert result["phases_ms"]["norms_and_elementwise"] == pytest.approx(20 / 1e3 / 2)


def test_top_kernels_sum_launches_of_one_name_and_sort_by_time(phases):
    events = [_launch(0, 1), _kernel("a", 0, 4, 1), _launch(1, 2), _kernel("b", 10, 10, 2),
              _launch(2, 3), _kernel("a", 30, 8, 3)]
    top = phases.phase_breakdown({"traceEvents": events}, num_steps=2, top=1)["top_kernels"]
    assert top == [{"name": "a", "phase": "norms_and_elementwise", "ms": pytest.approx(12 / 1e3 / 2), "launches": 1.0}]


def test_classify_by_name(phases):
    assert phases.classify_kernel("triton_hstu_bwd_dkdv_kernel") == "attention_backward"
    assert phases.classify_kernel("indexSelectLargeIndex") == "embeddings"
    assert phases.classify_kernel("multi_tensor_apply_kernel<FusedAdamMathFunctor>") == "optimizer"
    assert phases.classify_kernel("anything", ["e2e::embeddings", "aten::mm"]) == "embeddings"


def test_idle_gaps_go_to_the_kernel_that_ends_them_and_note_a_device_wait(phases):
    events = [
        _launch(0, 1), _kernel("a", 0, 10, 1),
        # the host waits for the device (10..30), then launches an embedding op at 80: the GPU
        # sat idle from 10 to 90 after the wait
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 5, "dur": 25, "tid": 1, "args": {}},
        _range("aten::embedding", 78, 5), _launch(80, 2), _kernel("indexSelectLargeIndex", 90, 10, 2),
        # a gap with no wait: the host was late launching (100..130)
        _launch(120, 3), _kernel("sm90_xmma_gemm", 130, 20, 3),
        # overlapping kernels: no gap between them
        _launch(125, 4), _kernel("b", 140, 20, 4),
    ]
    result = phases.phase_breakdown({"traceEvents": events}, num_steps=2, top=5)
    assert result["idle_ms"] == pytest.approx((80 + 30) / 1e3 / 2)
    assert result["idle_ms_after_waits"] == pytest.approx(80 / 1e3 / 2)
    assert result["idle_ms_by_next_phase"] == {"embeddings": pytest.approx(0.04), "gemm": pytest.approx(0.015)}
    first, second = result["largest_gaps"]
    assert first == {"ms": pytest.approx(0.08), "next_kernel": "indexSelectLargeIndex", "next_phase": "embeddings",
                     "host_op": "aten::embedding", "after_wait": True}
    assert second["next_phase"] == "gemm" and second["after_wait"] is False and second["host_op"] == ""
