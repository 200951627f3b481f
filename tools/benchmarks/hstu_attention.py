#!/usr/bin/env python3
"""Times jagged HSTU attention on a CUDA GPU: the Triton kernel against the PyTorch
reference and, as a same-machine yardstick, ``scaled_dot_product_attention`` (flash
backend) on the same shapes. Prints a markdown table (and writes JSON with ``--json``).

    python tools/benchmarks/hstu_attention.py [--shapes 4x256,4x128,2x64]
        [--lengths 1024,2048,4096,8192,16384] [--dists fixed,zipf] [--tokens 65536]
        [--sweep] [--bias] [--masks causal,all]

FLOPs count unmasked query-key pairs only (a causal sequence of L tokens has L(L+1)/2):
forward 2 * pairs * H * (Dqk + Dv) (the two matrix products), backward 2.5x forward (five
products, the flash-attention convention), whatever the kernel really computes. Timing:
CUDA events around each call after warm-up, median of ``--reps``; random normal inputs
(never zeros); backward timed alone (``torch.autograd.grad`` on a retained graph). Peak
memory is the allocator's peak during forward + backward above the inputs.
``fixed``: every sequence has the given length, ``tokens / length`` sequences.
``zipf``: lengths drawn from p(L) ~ L^-1.2 on [1, length] (one sequence of the full length
included) until the batch holds ``tokens`` tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_gr.ops.attention_mask import attention_mask  # noqa: E402
from megatron_gr.ops.hstu_attention import hstu_attention  # noqa: E402
from megatron_gr.ops.relative_bias import RelativeBiasInputs  # noqa: E402
from megatron_gr.ops.triton import hstu_configs  # noqa: E402
from megatron_gr.ops.triton.hstu_configs import KernelConfig  # noqa: E402

MASKS = {
    "causal": dict(),
    # targets (64 per sequence) + contextual prefix (8) + semi-local window 1024 / prefix 128
    "all": dict(num_targets=64, contextual_len=8, max_attn_len=1024, global_prefix_len=128),
}

# Candidates of --sweep, per head dim: (forward configs, backward configs).
SWEEP = {
    256: (
        [KernelConfig(128, 64, 8, 2), KernelConfig(128, 32, 8, 3)],
        [KernelConfig(64, 64, 8, 2, dq=KernelConfig(64, 32, 8, 2)),
         KernelConfig(64, 32, 8, 2, dq=KernelConfig(64, 32, 8, 2)),
         KernelConfig(64, 32, 8, 2, atomic_dq=True)],
    ),
    128: (
        [KernelConfig(128, 64, 8, 3), KernelConfig(128, 128, 8, 2)],
        [KernelConfig(64, 64, 8, 2, dq=KernelConfig(128, 64, 8, 2)),
         KernelConfig(64, 128, 8, 2, dq=KernelConfig(128, 64, 8, 2)),
         KernelConfig(64, 64, 8, 2, atomic_dq=True),
         KernelConfig(32, 128, 8, 2, atomic_dq=True)],
    ),
    64: (
        [KernelConfig(128, 64, 4, 3), KernelConfig(128, 128, 8, 3), KernelConfig(128, 64, 8, 3)],
        [KernelConfig(64, 128, 8, 2, dq=KernelConfig(128, 64, 8, 2)),
         KernelConfig(32, 128, 8, 3, dq=KernelConfig(128, 64, 8, 2)),
         KernelConfig(64, 128, 8, 2, atomic_dq=True),
         KernelConfig(32, 128, 8, 3, atomic_dq=True)],
    ),
}


def zipf_lengths(max_len: int, tokens: int, rng: np.random.Generator) -> list[int]:
    support = np.arange(1, max_len + 1)
    p = support ** -1.2
    p /= p.sum()
    lengths = [max_len]
    while sum(lengths) < tokens:
        lengths.append(int(rng.choice(support, p=p)))
    return lengths


def make_batch(lengths, heads, d, dtype, *, bias: bool, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, d, device="cuda", dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    offsets = torch.tensor([0, *np.cumsum(lengths).tolist()], device="cuda", dtype=torch.int64)
    rel = None
    if bias:
        gaps = torch.randint(0, 600, (total,), device="cuda", generator=g)
        rel = RelativeBiasInputs(
            position_weights=(0.1 * torch.randn(256, device="cuda", generator=g)).requires_grad_(),
            time_weights=(0.1 * torch.randn(128, device="cuda", generator=g)).requires_grad_(),
            timestamps=torch.cumsum(gaps, 0),
        )
    return q, k, v, offsets, rel


def unmasked_pairs(lengths, mask: dict) -> int:
    if not mask:
        return sum(n * (n + 1) // 2 for n in lengths)
    total = 0
    for n in set(lengths):
        m = attention_mask(
            torch.tensor([n], device="cuda"), n, max_attn_len=mask["max_attn_len"],
            contextual_len=mask["contextual_len"], global_prefix_len=mask["global_prefix_len"],
            num_targets=torch.tensor([min(mask["num_targets"], n - 1)], device="cuda"),
        )
        total += int(m.sum()) * lengths.count(n)
    return total


def time_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(forward, leaves, warmup, reps):
    """(forward ms, backward ms, peak MiB above the inputs) of ``forward()``."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = forward()
    grad = torch.randn_like(out)
    torch.autograd.grad(out, leaves, grad)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    del out

    def fwd():
        with torch.no_grad():
            forward()

    fwd_ms = time_ms(fwd, warmup, reps)
    out = forward()
    bwd_ms = time_ms(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True), warmup, reps)
    return fwd_ms, bwd_ms, peak


def run_case(impl, lengths, heads, d, dtype, mask_name, bias, args, seed=0):
    q, k, v, offsets, rel = make_batch(lengths, heads, d, dtype, bias=bias, seed=seed)
    mask = MASKS[mask_name]
    leaves = [q, k, v] + ([rel.position_weights, rel.time_weights] if rel is not None else [])
    max_len = max(lengths)
    if impl in ("triton", "pytorch"):
        targets = None
        if mask.get("num_targets"):
            targets = torch.tensor([min(mask["num_targets"], n - 1) for n in lengths], device="cuda")
        kwargs = dict(
            max_seq_len=max_len, alpha=d**-0.5, num_targets=targets, relative_bias=rel, max_len=max_len,
            max_attn_len=mask.get("max_attn_len", 0), contextual_len=mask.get("contextual_len", 0),
            global_prefix_len=mask.get("global_prefix_len", 0), kernel=impl,
        )

        def forward():
            return hstu_attention(q, k, v, offsets, **kwargs)
    else:  # SDPA flash, fixed lengths only: [B, H, N, D]
        from torch.nn.attention import SDPBackend, sdpa_kernel

        batch = len(lengths)
        qs, ks, vs = (t.detach().view(batch, max_len, heads, d).transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        leaves = [qs, ks, vs]

        def forward():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    fwd_ms, bwd_ms, peak = measure(forward, leaves, args.warmup, args.reps)
    flops = 2 * unmasked_pairs(lengths, mask) * heads * (d + d)
    return dict(fwd_ms=fwd_ms, bwd_ms=bwd_ms, fwd_tflops=flops / fwd_ms / 1e9, bwd_tflops=2.5 * flops / bwd_ms / 1e9,
                peak_mib=peak)


def sweep(heads, d, dtype, length, args):
    """Times every candidate config at one fixed length (causal); returns the best pair."""
    lengths = [length] * max(1, args.tokens // length)
    fwd_cands, bwd_cands = SWEEP[d]
    best_f = best_b = None
    for cfg in fwd_cands:
        with hstu_configs.override(forward=cfg, backward=bwd_cands[0]):
            r = _safe(run_case, "triton", lengths, heads, d, dtype, "causal", False, args)
        print(f"sweep {heads}x{d} N={length} forward {cfg}: {_fmt(r, 'fwd_tflops')} TFLOP/s", flush=True)
        if r and (best_f is None or r["fwd_tflops"] > best_f[1]):
            best_f = (cfg, r["fwd_tflops"])
    for cfg in bwd_cands:
        with hstu_configs.override(forward=best_f[0] if best_f else None, backward=cfg):
            r = _safe(run_case, "triton", lengths, heads, d, dtype, "causal", False, args)
        print(f"sweep {heads}x{d} N={length} backward {cfg}: {_fmt(r, 'bwd_tflops')} TFLOP/s", flush=True)
        if r and (best_b is None or r["bwd_tflops"] > best_b[1]):
            best_b = (cfg, r["bwd_tflops"])
    return (best_f[0] if best_f else None), (best_b[0] if best_b else None)


def _safe(fn, *a, **kw):
    try:
        return fn(*a, **kw)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    except Exception as error:  # a config that does not fit the chip: report, go on
        print(f"  failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
        torch.cuda.empty_cache()
        return None


def _fmt(r, key, digits=0):
    return "OOM/fail" if r is None else f"{r[key]:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4x256,4x128,2x64", help="heads x head dim, comma separated")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--dists", default="fixed,zipf")
    parser.add_argument("--masks", default="causal")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per batch")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--bias", action="store_true", help="also time with the relative position + time bias")
    parser.add_argument("--impls", default="triton,pytorch,sdpa")
    parser.add_argument("--reference-max-len", type=int, default=2048, help="longest length timed for the reference")
    parser.add_argument("--sweep", action="store_true", help="time the candidate configs at --sweep-len first and use the best")
    parser.add_argument("--sweep-len", type=int, default=8192)
    parser.add_argument("--sweep-shapes", default="", help="sweep only these shapes (default: all)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", help="write all rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    rng = np.random.default_rng(0)
    rows, best = [], {}
    device = torch.cuda.get_device_name()
    for heads, d in shapes:
        if args.sweep and (not args.sweep_shapes or f"{heads}x{d}" in args.sweep_shapes.split(",")):
            best[(heads, d)] = sweep(heads, d, dtype, args.sweep_len, args)
            print(f"best {heads}x{d}: forward {best[(heads, d)][0]}, backward {best[(heads, d)][1]}", flush=True)
        fwd_cfg, bwd_cfg = best.get((heads, d), (None, None))
        for dist in args.dists.split(","):
            for length in (int(x) for x in args.lengths.split(",")):
                lengths = [length] * max(1, args.tokens // length) if dist == "fixed" else zipf_lengths(length, args.tokens, rng)
                for mask in args.masks.split(","):
                    for bias in ([False, True] if args.bias else [False]):
                        for impl in args.impls.split(","):
                            if impl == "pytorch" and length > args.reference_max_len:
                                continue
                            if impl == "sdpa" and (dist != "fixed" or mask != "causal" or bias):
                                continue
                            with hstu_configs.override(forward=fwd_cfg, backward=bwd_cfg):
                                r = _safe(run_case, impl, lengths, heads, d, dtype, mask, bias, args)
                            row = dict(shape=f"{heads}x{d}", dist=dist, max_len=length, seqs=len(lengths),
                                       tokens=sum(lengths), mask=mask, bias=bias, impl=impl, **(r or {}))
                            rows.append(row)
                            print(f"{row['shape']} {dist} N={length} B={len(lengths)} {mask}{' +bias' if bias else ''} {impl}: "
                                  f"fwd {_fmt(r, 'fwd_tflops')} bwd {_fmt(r, 'bwd_tflops')} TFLOP/s, "
                                  f"fwd {_fmt(r, 'fwd_ms', 2)} ms bwd {_fmt(r, 'bwd_ms', 2)} ms peak {_fmt(r, 'peak_mib')} MiB",
                                  flush=True)
    print(f"\n{device}, {args.dtype}, {args.tokens} tokens per batch, torch {torch.__version__}\n")
    print("| shape | lengths | max len | seqs | mask | impl | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mask = r["mask"] + (" + bias" if r["bias"] else "")
        print(f"| {r['shape']} | {r['dist']} | {r['max_len']} | {r['seqs']} | {mask} | {r['impl']} | "
              f"{_fmt(r.get('fwd_ms') and r, 'fwd_ms', 2)} | {_fmt(r.get('fwd_ms') and r, 'fwd_tflops')} | "
              f"{_fmt(r.get('fwd_ms') and r, 'bwd_ms', 2)} | {_fmt(r.get('fwd_ms') and r, 'bwd_tflops')} | "
              f"{_fmt(r.get('fwd_ms') and r, 'peak_mib')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=device, args=vars(args), best={f"{h}x{d}": [str(c) for c in v] for (h, d), v in best.items()}, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
