"""Where a training step's GPU time goes: the kernels of a torch.profiler chrome trace
sorted into phases, and the GPU's busy time (for the host gaps: step wall time minus busy).

A kernel's phase comes from, in this order:

1. the host range it was launched in (the benchmark marks ``e2e::optimizer`` around the
   optimizer step, ``e2e::loss`` around the loss and ``e2e::embeddings`` around the item
   table and the input encodings); backward kernels inherit the range of the forward op
   whose autograd node launched them (the trace's ``Sequence number`` links the two);
2. its name (the attention kernels, GEMMs, embedding and loss kernels);
3. ``norms_and_elementwise`` for every other kernel; copies and fills are ``copies``.

The GPU's idle time is listed too: each gap between its busy intervals, charged to the
kernel that ends it (its phase and the host operator that launched it), and marked when
the gap opened while the host sat in a synchronising call (the queue ran dry at a device
wait, so the host work after the wait is what the GPU waited for).

Only the standard chrome-trace fields are read (``ph: X`` events with ``cat`` kernel /
gpu_memcpy / gpu_memset / cuda_runtime / cuda_driver / cpu_op / user_annotation, and the
``correlation``, ``Sequence number`` args), so any torch 2.x trace works.
"""

from __future__ import annotations

import bisect
import re
from collections import defaultdict
from typing import Iterable, Optional

PHASES = (
    "attention_forward",
    "attention_backward",
    "gemm",
    "norms_and_elementwise",
    "embeddings",
    "loss",
    "optimizer",
    "copies",
)
ANNOTATIONS = {"e2e::optimizer": "optimizer", "e2e::loss": "loss", "e2e::embeddings": "embeddings"}

_GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
_LAUNCH_CATEGORIES = {"cuda_runtime", "cuda_driver"}
_WAITS = re.compile(r"Synchronize")  # the host calls that wait for the device (a read: its copy, then this)
_RANGE_CATEGORIES = {"cpu_op", "user_annotation", "python_function"}
_BACKWARD_PREFIX = "autograd::engine::evaluate_function:"

_NAME_RULES = (
    ("attention_forward", re.compile(r"hstu_fwd")),
    ("attention_backward", re.compile(r"hstu_bwd")),
    ("gemm", re.compile(r"gemm|xmma|cutlass|nvjet|wgmma|cublas|splitKreduce|matmul_kernel", re.I)),
    ("optimizer", re.compile(r"adam|sgd_|FusedAdam|l2norm", re.I)),
    ("embeddings", re.compile(
        r"embedding|index_select|indexSelect|indexing_backward|index_put|scatter_add|hash_|probe|dedupe|"
        r"segment_sum|dynamic_rows|sparse_adam|radixSort|RadixSort", re.I)),
    ("loss", re.compile(r"logsumexp|log_softmax|softmax_warp|cross_entropy|nll_loss", re.I)),
)


def classify_kernel(name: str, ranges: Iterable[str] = ()) -> str:
    """The phase of a kernel ``name`` launched inside the host ``ranges`` (outermost
    first; annotation names of :data:`ANNOTATIONS` decide first)."""
    for rng in reversed(list(ranges)):
        if rng in ANNOTATIONS:
            return ANNOTATIONS[rng]
    for phase, pattern in _NAME_RULES:
        if pattern.search(name):
            return phase
    return "norms_and_elementwise"


def phase_breakdown(trace: dict, *, num_steps: int, top: int = 25) -> dict:
    """Per-step GPU milliseconds by phase of a chrome trace dict holding ``num_steps``
    steps, the GPU's busy milliseconds per step (the union of its kernels and copies), the
    kernel count per step and the ``top`` kernels by time (name shortened, phase, ms and
    launches per step): which kernels fill a phase."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    gpu = [e for e in events if e.get("cat") in _GPU_CATEGORIES]
    launch_of = {}
    for e in events:
        if e.get("cat") in _LAUNCH_CATEGORIES and "correlation" in e.get("args", {}):
            launch_of[e["args"]["correlation"]] = e
    ranges = _RangeIndex([e for e in events if e.get("cat") in _RANGE_CATEGORIES])
    sums = defaultdict(float)
    by_kernel = defaultdict(lambda: [0.0, 0])
    for e in gpu:
        if e.get("cat") != "kernel":
            sums["copies"] += e.get("dur", 0.0)
            continue
        launch = launch_of.get(e.get("args", {}).get("correlation"))
        enclosing = ranges.enclosing(launch["tid"], launch["ts"]) if launch is not None else []
        phase = classify_kernel(e.get("name", ""), ranges.phases_of(enclosing))
        sums[phase] += e.get("dur", 0.0)
        entry = by_kernel[(e.get("name", ""), phase)]
        entry[0] += e.get("dur", 0.0)
        entry[1] += 1
    busy = _union_length([(e["ts"], e["ts"] + e.get("dur", 0.0)) for e in gpu])
    steps = max(num_steps, 1)
    waits = sorted((e["ts"], e["ts"] + e.get("dur", 0.0)) for e in events
                   if e.get("cat") in _LAUNCH_CATEGORIES and _WAITS.search(e.get("name", "")))
    gaps = []
    for start, stop, after in _gaps(gpu):
        launch = launch_of.get(after.get("args", {}).get("correlation"))
        enclosing = ranges.enclosing(launch["tid"], launch["ts"]) if launch is not None else []
        gaps.append({
            "ms": (stop - start) / 1e3,
            "next_kernel": after.get("name", "")[:80],
            "next_phase": classify_kernel(after.get("name", ""), ranges.phases_of(enclosing))
            if after.get("cat") == "kernel" else "copies",
            "host_op": enclosing[-1].get("name", "")[:80] if enclosing else "",
            "after_wait": any(w0 <= start <= w1 for w0, w1 in waits),
        })
    by_next = defaultdict(float)
    for gap in gaps:
        by_next[gap["next_phase"]] += gap["ms"]
    return {
        "phases_ms": {phase: sums.get(phase, 0.0) / 1e3 / steps for phase in PHASES},
        "gpu_busy_ms": busy / 1e3 / steps,
        "kernels_per_step": sum(e.get("cat") == "kernel" for e in gpu) / steps,
        "top_kernels": [
            {"name": name[:120], "phase": phase, "ms": dur / 1e3 / steps, "launches": count / steps}
            for (name, phase), (dur, count) in sorted(by_kernel.items(), key=lambda item: -item[1][0])[:top]
        ],
        "idle_ms": sum(g["ms"] for g in gaps) / steps,
        "idle_ms_after_waits": sum(g["ms"] for g in gaps if g["after_wait"]) / steps,
        "idle_ms_by_next_phase": {phase: ms / steps for phase, ms in sorted(by_next.items(), key=lambda kv: -kv[1])},
        "largest_gaps": sorted(gaps, key=lambda g: -g["ms"])[:top],
    }


class _RangeIndex:
    """Host ranges per thread, answering which ranges hold a timestamp; backward nodes get
    the annotation of the forward op they came from (matched by sequence number)."""

    def __init__(self, ranges: list[dict]):
        self.by_thread: dict = defaultdict(list)
        for e in ranges:
            self.by_thread[e["tid"]].append(e)
        self.starts = {}
        for tid, items in self.by_thread.items():
            items.sort(key=lambda e: (e["ts"], -e.get("dur", 0.0)))
            self.starts[tid] = [e["ts"] for e in items]
        self.forward_phase = self._forward_phases()

    def enclosing(self, tid, ts: float) -> list[dict]:
        """Ranges of thread ``tid`` holding ``ts``, outermost first."""
        items = self.by_thread.get(tid, [])
        stop = bisect.bisect_right(self.starts.get(tid, []), ts)
        return [e for e in items[:stop] if e["ts"] <= ts <= e["ts"] + e.get("dur", 0.0)]

    def phases_of(self, enclosing: list[dict]) -> list[str]:
        names = []
        for e in enclosing:
            names.append(e.get("name", ""))
            if e.get("name", "").startswith(_BACKWARD_PREFIX):
                phase = self.forward_phase.get(_sequence_number(e))
                if phase is not None:
                    names.append(phase)
        return names

    def _forward_phases(self) -> dict:
        """Sequence number -> annotation name, for forward ops run inside an annotation."""
        out = {}
        for tid, items in self.by_thread.items():
            open_annotations: list[dict] = []
            for e in items:
                open_annotations = [a for a in open_annotations if a["ts"] + a.get("dur", 0.0) >= e["ts"]]
                if e.get("name") in ANNOTATIONS:
                    open_annotations.append(e)
                    continue
                seq = _sequence_number(e)
                if seq is not None and open_annotations and not e.get("name", "").startswith(_BACKWARD_PREFIX):
                    out.setdefault(seq, open_annotations[-1]["name"])
        return out


def _sequence_number(event: dict) -> Optional[int]:
    value = event.get("args", {}).get("Sequence number")
    return int(value) if value is not None else None


def _gaps(gpu: list[dict]) -> list[tuple[float, float, dict]]:
    """The GPU's idle intervals between its first and last event: (start, end, the event
    that ends the gap)."""
    out, end = [], None
    for e in sorted(gpu, key=lambda e: e["ts"]):
        if end is not None and e["ts"] > end:
            out.append((end, e["ts"], e))
        stop = e["ts"] + e.get("dur", 0.0)
        end = stop if end is None else max(end, stop)
    return out


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total
