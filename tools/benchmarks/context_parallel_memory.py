#!/usr/bin/env python3
"""Per-rank memory of one training step of the HSTU retrieval model under context
parallelism, simulated on one device: the rank holds its share of one history of L tokens
(rank 0 of a group of CP: chunks 0 and 2 CP - 1, L / CP tokens; every rank holds as many)
and runs forward, backward and the optimizer step. The all-gather and reduce-scatter of
the key exchange become local copies of the same sizes (no process group), so the rank's
buffers are those of a real run.

    # CPU: activations held between forward and backward, per rank (tiny model, fp32)
    python tools/benchmarks/context_parallel_memory.py --device cpu --model tiny --cp 1,2,4 --lengths 2048,4096
    # GPU: the same at given lengths, or the longest history a step fits in (--search)
    python tools/benchmarks/context_parallel_memory.py --device cuda --model benchmark --cp 1,2,4 --search \\
        --out docs/benchmarks/data/context_parallel_memory_h100.jsonl

Models: ``benchmark`` = 8 layers, hidden 1024, 4 heads of 256 (bf16 on a GPU, Triton
attention), ``tiny`` = 2 layers, hidden 64, 2 heads of 32. Both keep the position
embedding of max_seq_len = L rows (it grows with L, as weights, gradients and Adam state).
Reported per (CP, L): ``static`` (weights, gradient buffers and optimizer state before the
step; Adam's state is allocated by the step and shows in the peak), ``held`` (tensors kept
from the forward for the backward) and ``peak`` (the most allocated during the step).

CUDA reads the allocator's statistics. The CPU keeps none: there the storages created during
the step are summed after every op (``LiveTensorBytes``), and attention without context
parallelism keeps q, k, v for its backward as the kernels do (the reference attention
would otherwise keep its L x L score matrices). ``--search`` (GPU): per CP, the peak at 8k and
16k tokens per rank, fitted by a line (every term grows linearly in L: activations, position
table, key exchange), predicts the longest L below the device's memory less ``--margin-gib``;
steps at that L confirm it and refine it (5% shorter after an out-of-memory error). Memory
does not depend on the mask but time does (O(L^2) with the full causal mask: about 40 s a
step at L = 290k and CP = 1 with the relative bias, by the kernels' 220 / 96 TFLOP/s), so the confirming steps run with a ``--window``-key local window, and the
16k point runs with both to show the peaks equal (``window_peak_difference``). A table row
per CP is printed as soon as that CP is done; ``--out`` gets each result as it comes; the
refinements stop after ``--budget-s`` (about 3.5 minutes per CP on an H100, most of it the confirming steps). At CP = 1
L stops at the unsharded kernels' 32-bit row limit (``kernel_row_limit``: 524k tokens at
the benchmark size, which an H200 would otherwise pass).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

MODELS = {
    "benchmark": dict(num_layers=8, hidden_size=1024, num_attention_heads=4, qk_head_dim=256, v_head_dim=256),
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=2, qk_head_dim=32, v_head_dim=32),
}
GIB = 2**30


class SimulatedGroup:
    """Stands for one rank of a context-parallel group (the split plan asks only these)."""

    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


class SimulatedCollectives:
    """The two collectives of the key exchange as local copies of the same sizes: every
    rank is assumed to send what this one sends."""

    @staticmethod
    def all_gather_into_tensor(output, tensor, group=None):
        output.view(group.size(), *tensor.shape).copy_(tensor.unsqueeze(0).expand(group.size(), *tensor.shape))

    @staticmethod
    def reduce_scatter_tensor(output, tensor, group=None):
        torch.sum(tensor.view(group.size(), *output.shape), dim=0, out=output)


def fresh_tensor_bytes(existing: list[torch.Tensor]):
    """``LiveTensorBytes`` that leaves out the storages of ``existing`` tensors: views of
    weights (megatron's DDP keeps all of them in one buffer) are not step memory."""
    from megatron_gr.training.live_memory import LiveTensorBytes

    skip = {t.untyped_storage().data_ptr() for t in existing}

    class FreshTensorBytes(LiveTensorBytes):
        def current(self) -> int:
            return sum(s.nbytes() for s in list(self._storages) if s.data_ptr() not in skip)

    return FreshTensorBytes()


class _KeepInputsAttention(torch.autograd.Function):
    """The reference attention keeping only q, k, v for its backward, as the kernels do."""

    @staticmethod
    def forward(ctx, q, k, v, offsets, kwargs):
        from megatron_gr.ops.hstu_attention import hstu_attention

        ctx.save_for_backward(q, k, v, offsets)
        ctx.kwargs = kwargs
        return hstu_attention(q, k, v, offsets, **kwargs)

    @staticmethod
    def backward(ctx, grad_out):
        from megatron_gr.ops.hstu_attention import hstu_attention_backward

        q, k, v, offsets = ctx.saved_tensors
        dq, dk, dv, _, _ = hstu_attention_backward(grad_out, q, k, v, offsets, **ctx.kwargs)
        return dq, dk, dv, None, None


def keep_inputs_attention(q, k, v, offsets, **kwargs):
    if kwargs.get("relative_bias") is not None:
        raise ValueError("the CPU measurement runs without the relative bias (its weights would need gradients here)")
    return _KeepInputsAttention.apply(q, k, v, offsets, kwargs)


@contextlib.contextmanager
def simulated_rank(device: str):
    """The exchange's collectives as local copies; on the CPU, attention without context
    parallelism keeping only its inputs. Restored on exit."""
    from megatron_gr.transformer import stu_layer
    from megatron_gr.transformer.context_parallel import attention

    saved = attention.dist, stu_layer.hstu_attention
    attention.dist = SimulatedCollectives()
    if device == "cpu":
        stu_layer.hstu_attention = keep_inputs_attention
    try:
        yield
    finally:
        attention.dist, stu_layer.hstu_attention = saved


def experiment(args, length: int, *, window: int = 0):
    from megatron_gr.config import ExperimentConfig

    model = {**MODELS[args.model], "max_seq_len": length, "hidden_dropout": 0.0, "embedding_dropout": 0.0,
             "relative_attention_bias": args.device == "cuda", "max_attn_len": window}
    return ExperimentConfig.from_dict({
        "model": model,
        "training": {"device": args.device, "seed": 1, "lr": 1e-3,
                     "kernel_backend": "triton" if args.device == "cuda" else "pytorch"},
        "parallel": {"context_parallel_split_threshold": 2},
    })


def batch_of(length: int, num_items: int, device):
    from megatron_gr.data.jagged import JaggedBatch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, num_items + 1, (length + 1,), generator=g)
    return JaggedBatch(
        item_ids=ids[:-1], timestamps=torch.cumsum(torch.randint(1, 600, (length,), generator=g), 0),
        ratings=torch.zeros(length), offsets=torch.tensor([0, length]), user_ids=torch.tensor([1]),
        labels=ids[1:], max_len=length, negative_ids=torch.randint(1, num_items + 1, (256,), generator=g),
        token_keys=torch.arange(length), dropout_seed=1,
    ).to(device)


class ItemsOnly:
    """The one thing the retrieval model's stage needs of its data: the item space."""

    def __init__(self, num_items: int):
        from megatron_gr.data.item_space import ItemSpace

        self.items = ItemSpace(vocab=np.concatenate([[-1], np.arange(1, num_items + 1)]), raw_keys=False)
        self.num_items = num_items


def step_memory(args, runtime, cp: int, length: int, *, window: int = 0) -> dict:
    """Static, held and peak bytes of one training step of rank 0 of CP ranks (``window``:
    attention to the last ``window`` keys only, see :func:`search`)."""
    from megatron_gr.models.registry import get_train_spec
    from megatron_gr.training.model_setup import build_model, unwrap
    from megatron_gr.training.optimizer_setup import build_optimizer
    from megatron_gr.training.plan import make_plan

    config = experiment(args, length, window=window)
    plan = make_plan(config, num_items=args.num_items, world_size=1, device=runtime.device)
    chunks = build_model(plan, get_train_spec(config.model.type), ItemsOnly(args.num_items))
    optimizer = build_optimizer(config.training, runtime, chunks)
    if cp > 1:
        unwrap(chunks[0]).context_group = SimulatedGroup(cp)
    batch = batch_of(length, args.num_items, runtime.device)
    record = {"cp": cp, "length": length, "tokens_per_rank": length // cp, **({"window": window} if window else {})}
    try:
        if runtime.device.type == "cuda":
            record.update(_gpu_step(chunks, optimizer, batch))
        else:
            record.update(_cpu_step(chunks, batch))
    except torch.OutOfMemoryError:
        record["out_of_memory"] = True
    del chunks, optimizer, batch
    gc.collect()
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def _gpu_step(chunks, optimizer, batch) -> dict:
    torch.cuda.synchronize()
    static = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = chunks[0](batch).sum()
    held = torch.cuda.memory_allocated() - static
    loss.backward()
    optimizer.step()
    torch.cuda.synchronize()
    return {"static": static, "held": held, "peak": torch.cuda.max_memory_allocated()}


def _cpu_step(chunks, batch) -> dict:
    # (megatron's DDP names its gradient buffers ``buffers``, hiding the module's)
    existing = [t for chunk in chunks for t in (*chunk.parameters(), *torch.nn.Module.buffers(chunk))]
    existing += [buffer.grad_data for chunk in chunks for buffer in chunk.buffers]
    tracker = fresh_tensor_bytes(existing)
    with tracker:
        loss = chunks[0](batch).sum()
        held = tracker.current()
        loss.backward()
    return {"held": held, "peak_step_tensors": tracker.peak}


def kernel_row_limit(model: str) -> int:
    """The longest sequence the unsharded attention kernels address (CP = 1): their row
    offsets are 32-bit, and a row of the fused U|V|Q|K projection is 2 (dv + dqk) x heads
    elements wide. The SHARDED kernels (CP > 1) use 64-bit offsets."""
    m = MODELS[model]
    return (2**31 - 1) // (m["num_attention_heads"] * 2 * (m["qk_head_dim"] + m["v_head_dim"]))


def search(args, runtime, cp: int, deadline: float) -> list[dict]:
    """The longest history whose step fits the GPU at this CP (:func:`longest_length` with
    the device's memory, or ``--memory-gib`` of it, less ``--margin-gib``)."""
    total = torch.cuda.get_device_properties(runtime.device).total_memory
    if args.memory_gib is not None:  # answer for a smaller GPU: the allocator refuses past it
        if args.memory_gib * GIB > total:
            raise SystemExit(f"--memory-gib {args.memory_gib} is more than this GPU's {total / GIB:.1f} GiB")
        total = int(args.memory_gib * GIB)
        torch.cuda.set_per_process_memory_fraction(total / torch.cuda.get_device_properties(runtime.device).total_memory)
    capacity = total - int(args.margin_gib * GIB)

    def measure(length: int, window: int) -> dict:
        return step_memory(args, runtime, cp, length, window=window)

    limit = kernel_row_limit(args.model) if cp == 1 else None
    return longest_length(measure, cp=cp, capacity=capacity, window=args.window, limit=limit, deadline=deadline)


def longest_length(measure, *, cp: int, capacity: int, window: int, limit, deadline: float) -> list[dict]:
    """The measured points, the mask check, the prediction, its confirmations and a summary
    (the last row). ``measure(length, window)``: a step's record (``peak`` bytes, or
    ``out_of_memory``); ``limit``: the longest length the kernels take (None: any).

    Full causal attention costs O(L^2) time but its step's memory is linear in L: the
    kernels and the key exchange allocate the same tensors under any mask (nothing
    quadratic; the gathered keys depend on the causal mask, not on a window). So the two
    points (8k and 16k tokens per rank) are measured with the full mask, the second again
    with a ``window``-key local window (``window_peak_difference``: must be 0), and the long
    steps that confirm the longest L run with the window: seconds instead of minutes per
    step. The line through the points predicts L; each step that fits gives the next guess
    (the line through it and the second point), each out-of-memory step 5% less. The
    guesses after the first step that fits stop at ``deadline`` (``time.monotonic()``)."""
    points = [measure(tokens * cp, 0) for tokens in (8192, 16384)]
    (l1, p1), (l2, p2) = ((r["length"], r["peak"]) for r in points)
    windowed = measure(l2, window)
    slope = (p2 - p1) / (l2 - l1)
    grain = 2048 * cp

    def bounded(length: float) -> int:
        length = int(length) // grain * grain
        return min(length, limit // grain * grain) if limit else length

    predicted = int((capacity - p1) / slope + l1)
    difference = windowed["peak"] - p2
    results = points + [windowed, {"cp": cp, "predicted_longest": predicted, "bytes_per_token": slope,
                                   "capacity": capacity, "window_peak_difference": difference,
                                   **({"kernel_row_limit": limit} if limit else {})}]
    longest, length = None, bounded(predicted)  # longest: (length, peak) of the longest step that fit
    for _ in range(6):
        if longest and (time.monotonic() > deadline or length <= longest[0]):
            break
        confirmed = measure(length, window)
        results.append(confirmed)
        if confirmed.get("out_of_memory"):
            length = bounded(length * 0.95)
            continue
        if longest is None or length > longest[0]:
            longest = (length, confirmed["peak"])
        per_token = (confirmed["peak"] - p2) / max(length - l2, 1)
        length = bounded((capacity - p2) / per_token + l2) if per_token > 0 else length
    summary = {"cp": cp, "longest": longest and longest[0], "peak_at_longest": longest and longest[1],
               "bytes_per_token": slope, "capacity": capacity, "window_peak_difference": difference,
               "capped_by_kernel_rows": bool(limit and longest and longest[0] == bounded(limit))}
    return results + [summary]


TABLE_HEADER = ("| CP | longest L that trains (confirmed) | bytes per token of L (fit) | peak at that L | "
                "windowed - full peak |\n| ---: | ---: | ---: | ---: | ---: |")


def table_row(summary: dict) -> str:
    """The docs' row of one CP's search (``docs/benchmarks/context_parallel.md``)."""
    longest = "none confirmed" if summary["longest"] is None else f"{summary['longest']:,}"
    if summary["capped_by_kernel_rows"]:
        longest += " (kernel row limit)"
    peak = "-" if summary["peak_at_longest"] is None else f"{summary['peak_at_longest'] / GIB:.1f} GiB"
    return (f"| {summary['cp']} | {longest} | {summary['bytes_per_token'] / 1000:.1f} KB | {peak} | "
            f"{summary['window_peak_difference'] / 2**20:+.1f} MiB |")


def main() -> int:
    from megatron_gr.config import TrainingConfig
    from megatron_gr.training.runtime import initialize, shutdown

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=tuple(MODELS), default="benchmark")
    parser.add_argument("--cp", default="1,2,4", help="context-parallel sizes")
    parser.add_argument("--lengths", default="4096", help="history lengths (multiples of 2 x CP)")
    parser.add_argument("--search", action="store_true", help="GPU: the longest history whose step fits")
    parser.add_argument("--num-items", type=int, default=100_000, help="item table rows")
    parser.add_argument("--margin-gib", type=float, default=2.0, help="memory left free in --search")
    parser.add_argument("--memory-gib", type=float,
                        help="--search: fit this much GPU memory instead of the whole GPU's (e.g. 79.6, an H100 80GB's, on an H200)")
    parser.add_argument("--window", type=int, default=1024, help="--search: the local window of the long steps")
    parser.add_argument("--budget-s", type=float, default=50.0,
                        help="--search: no confirmation step starts after this many seconds (per CP, its share)")
    parser.add_argument("--out", type=Path, help="JSON lines of the results")
    args = parser.parse_args()
    if args.search and args.device != "cuda":
        parser.error("--search needs --device cuda")
    runtime = initialize(TrainingConfig(device=args.device, seed=1))
    sizes = [int(c) for c in args.cp.split(",")]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    if args.out:  # one JSON line per result as it comes: a run cut short keeps what it measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("")
    if args.search:
        print(f"{device_name}, {args.model} model, margin {args.margin_gib} GiB, long steps with a {args.window}-key window")
        print(TABLE_HEADER, flush=True)
    begin = time.monotonic()
    with simulated_rank(args.device):
        for i, cp in enumerate(sizes):
            if args.search:
                rows = search(args, runtime, cp, deadline=begin + args.budget_s * (i + 1) / len(sizes))
            else:
                rows = [step_memory(args, runtime, cp, int(length)) for length in args.lengths.split(",")]
            for row in rows:
                line = json.dumps({"device": device_name, "model": args.model, **row})
                print(line, file=sys.stderr if args.search else sys.stdout, flush=True)
                if args.out:
                    with args.out.open("a") as out:
                        out.write(line + "\n")
            if args.search:
                print(table_row(rows[-1]), flush=True)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
