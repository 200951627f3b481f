#!/usr/bin/env python3
"""Times jagged HSTU attention on a CUDA GPU: the Triton kernel against the PyTorch
reference and, as a same-machine yardstick, ``scaled_dot_product_attention`` (flash
backend) on the same shapes. Prints a markdown table (and writes JSON with ``--json``).

    python tools/benchmarks/hstu_attention.py [--shapes 4x256,4x128,2x64]
        [--lengths 1024,2048,4096,8192,16384] [--dists fixed,zipf] [--tokens 65536]
        [--sweep] [--bias [--bias-paths uniform,per_pair]] [--masks causal,all] [--bwd-variants fused,split] [--kernel-times]

FLOPs count unmasked query-key pairs only (a causal sequence of L tokens has L(L+1)/2):
forward 2 * pairs * H * (Dqk + Dv) (the two matrix products), backward 2.5x forward (five
products, the flash-attention convention), whatever the kernel really computes. Timing:
CUDA events around each call after warm-up, median of ``--reps``, with the GPU held busy
(``torch.cuda._sleep``) while the host queues the call, so the time is the device's and not
the host's launch latency (hidden behind earlier work in a training step); random normal inputs
(never zeros); backward timed alone (``torch.autograd.grad`` on a retained graph). Peak
memory is the allocator's peak during forward + backward above the inputs.
``fixed``: every sequence has the given length, ``tokens / length`` sequences.
``zipf``: lengths drawn from p(L) ~ L^-1.2 on [1, length] (one sequence of the full length
included) until the batch holds ``tokens`` tokens.
``--bwd-variants``: the Triton rows are timed once per backward variant of
``hstu_configs.BACKWARD_VARIANTS`` (impl ``triton fused``, ``triton split``; the forward is
the same in both, so its two timings show the run-to-run spread); ``--sweep`` then times
each variant's candidates and uses each variant's best, and adds ``triton tables`` rows
(the default tables and variant: the baseline).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
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

# Candidates of --sweep, per head dim: forward configs and each backward variant's configs
# (at most four each, so that a sweep of two shapes compiles in a few minutes). Split: dv
# launch = the config's own blocks, dk launch = ``dk``, dq kernel = ``dq``; --kernel-times
# tells the three apart, so candidates mix blocks freely. Two programs share an SM where
# the 4-warp configs stay <= 255 registers and ~113 KiB of shared memory, and where an
# 8-warp config is capped at 128 registers (``maxnreg``): then one program's SiLU work can
# overlap the other's matrix products (tools/benchmarks/hstu_kernel_resources.py
# --candidates prints registers, spills and programs per SM for each).
def _split(dv, dk, dq):
    return replace(dv, split_dkdv=True, dk=dk, dq=dq)


_K = KernelConfig
SWEEP = {
    256: dict(
        forward=[_K(128, 32, 8, 3), _K(128, 64, 8, 2), _K(128, 32, 8, 4)],
        fused=[_K(64, 64, 8, 2, dq=_K(128, 32, 8, 3))],
        split=[_split(_K(32, 128, 8, 3), _K(32, 128, 8, 3), _K(128, 32, 8, 3)),
               _split(_K(32, 64, 4, 2), _K(32, 128, 8, 3), _K(128, 32, 8, 3)),
               _split(_K(32, 128, 8, 4), _K(32, 128, 8, 3), _K(128, 32, 8, 4))],
    ),
    128: dict(
        forward=[_K(128, 32, 8, 3, maxnreg=128), _K(128, 64, 8, 3), _K(128, 64, 8, 3, maxnreg=128)],
        fused=[_K(64, 128, 8, 2, dq=_K(128, 32, 8, 3, maxnreg=128)),
               _K(64, 128, 8, 3, dq=_K(128, 32, 8, 3, maxnreg=128)),
               _K(64, 128, 8, 2, dq=_K(128, 64, 8, 3, maxnreg=128))],
        split=[_split(_K(32, 128, 8, 3, maxnreg=128), _K(32, 128, 8, 3, maxnreg=128), _K(128, 32, 8, 3, maxnreg=128))],
    ),
    64: dict(
        forward=[_K(128, 64, 4, 3), _K(128, 128, 8, 3), _K(128, 64, 8, 3, maxnreg=128)],
        fused=[_K(64, 128, 8, 2), _K(64, 128, 8, 3, dq=_K(128, 32, 8, 3, maxnreg=128)),
               _K(64, 128, 8, 3, dq=_K(128, 64, 8, 3, maxnreg=128))],
        split=[_split(_K(32, 128, 8, 3, maxnreg=128), _K(32, 128, 8, 3, maxnreg=128), _K(128, 32, 8, 3, maxnreg=128))],
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


def _bias_cases(args) -> list[tuple[bool, str]]:
    """(bias, relative-bias path) of each timed case; path "" leaves the kernels' choice."""
    cases = [(False, "")]
    if args.bias:
        cases += [(True, path) for path in (args.bias_paths.split(",") if args.bias_paths else [""])]
    return cases


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


# GPU clock cycles of busy-waiting queued before each timed call: ~2 ms at H100 clocks,
# longer than the host needs to queue a backward's launches.
_HOST_LEAD_CYCLES = 4_000_000


def time_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        torch.cuda._sleep(_HOST_LEAD_CYCLES)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def backward_kernel_ms(backward, reps: int = 3) -> dict:
    """Mean device ms per call of each Triton backward kernel launch in ``backward()``, read
    from the profiler: ``dk/dv`` (fused) or ``dk`` and ``dv`` (split: the wrapper launches
    the key-block kernel for dk first), and ``dq``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            backward()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    launches = [e for e in kernels if e.name.startswith("hstu_bwd_")]
    key_launches = sum("dkdv" in e.name for e in launches) // reps
    names = {1: ["dk/dv"], 2: ["dk", "dv"]}.get(key_launches, [f"key{i}" for i in range(key_launches)])
    totals: dict = {}
    i = 0
    for e in kernels:
        if "dkdv" in e.name:
            name, i = names[i % len(names)], i + 1
        elif e.name.startswith("hstu_bwd_"):
            name = "dq"
        else:
            name = "other"  # zero fills, casts: whatever else the backward launches
        totals[name] = totals.get(name, 0.0) + e.time_range.elapsed_us() / 1e3 / reps
    return totals


def measure(forward, leaves, warmup, reps, kernel_times=False):
    """(forward ms, backward ms, peak MiB above the inputs, backward ms per kernel or None)
    of ``forward()``."""
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
    kernels = None
    if kernel_times:
        try:
            kernels = backward_kernel_ms(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True))
        except Exception as error:  # the profiler is a diagnostic: never lose the timings to it
            print(f"  backward kernel times unavailable: {type(error).__name__}: {error}", flush=True)
    return fwd_ms, bwd_ms, peak, kernels


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
    fwd_ms, bwd_ms, peak, kernels = measure(forward, leaves, args.warmup, args.reps,
                                            kernel_times=impl == "triton" and getattr(args, "kernel_times", False))
    flops = 2 * unmasked_pairs(lengths, mask) * heads * (d + d)
    row = dict(fwd_ms=fwd_ms, bwd_ms=bwd_ms, fwd_tflops=flops / fwd_ms / 1e9, bwd_tflops=2.5 * flops / bwd_ms / 1e9,
               peak_mib=peak)
    if kernels:
        row["bwd_kernel_ms"] = kernels
    return row


# A candidate whose output or gradients differ from the default configs' by more than this
# (relative, whole tensor) is reported and never chosen: bf16 rounding differs by ~1e-3.
_SWEEP_MAX_DIFF = 2e-2


def triton_results(lengths, heads, d, dtype):
    """[out, dq, dk, dv] of the Triton kernels under the active configs, causal, seed 1."""
    q, k, v, offsets, _ = make_batch(lengths, heads, d, dtype, bias=False, seed=1)
    out = hstu_attention(q, k, v, offsets, max_seq_len=max(lengths), alpha=d**-0.5, kernel="triton")
    grad = torch.randn(out.shape, device="cuda", dtype=dtype, generator=torch.Generator(device="cuda").manual_seed(2))
    return [out.detach(), *torch.autograd.grad(out, [q, k, v], grad)]


def max_rel_diff(got, want) -> float:
    """Largest relative difference over the tensors; inf where one holds a NaN or an inf."""
    diffs = [(g.float() - w.float()).norm() / w.float().norm().clamp(min=1e-30) for g, w in zip(got, want)]
    return max(float(x) if torch.isfinite(x) else float("inf") for x in diffs)


def sweep(heads, d, dtype, length, args, variants):
    """Times every candidate config at one fixed length (causal); returns the best forward
    config and {variant: best backward config}. Each candidate's output and gradients are
    first compared with the default configs' on the same inputs."""
    lengths = [length] * max(1, args.tokens // length)
    cands = SWEEP[d]
    reference = triton_results(lengths, heads, d, dtype)

    def checked(kind, cfg, count, **configs):
        """Times ``cfg`` if its first ``count`` results (out; out, dq, dk, dv) match."""
        # NaN-filled blocks of the result sizes, freed: the caching allocator hands them to
        # the next outputs, so that rows a candidate leaves unwritten show as NaN.
        poison = [torch.full_like(t, float("nan")) for t in reference]
        del poison
        with hstu_configs.override(**configs):
            diff = _safe(lambda: max_rel_diff(triton_results(lengths, heads, d, dtype)[:count], reference[:count]))
            r = _safe(run_case, "triton", lengths, heads, d, dtype, "causal", False, args) if diff is not None else None
        ok = diff is not None and diff < _SWEEP_MAX_DIFF
        key = "fwd_tflops" if kind == "forward" else "bwd_tflops"
        kernels = r.get("bwd_kernel_ms") if r and kind != "forward" else None
        print(f"sweep {heads}x{d} N={length} {kind} {cfg}: {_fmt(r, key)} TFLOP/s, max rel diff vs default "
              f"{'n/a' if diff is None else f'{diff:.1e}'}{'' if ok else ' REJECTED'}"
              + (" | " + ", ".join(f"{k} {v:.2f} ms" for k, v in kernels.items()) if kernels else ""), flush=True)
        return r if ok else None

    best_f = None
    for cfg in cands["forward"]:
        r = checked("forward", cfg, 1, forward=cfg)
        if r and (best_f is None or r["fwd_tflops"] > best_f[1]):
            best_f = (cfg, r["fwd_tflops"])
    best_b = {}
    for variant in variants:
        for cfg in cands[variant]:
            r = checked(f"backward [{variant}]", cfg, 4, forward=best_f[0] if best_f else None, backward=cfg)
            if r and (variant not in best_b or r["bwd_tflops"] > best_b[variant][1]):
                best_b[variant] = (cfg, r["bwd_tflops"])
    return (best_f[0] if best_f else None), {v: c for v, (c, _) in best_b.items()}


def _timed_configs(impl, variants, fwd_cfg, bwd_cfgs):
    """(row label, backward variant, ``hstu_configs.override`` arguments) of each row of
    ``impl``: one per backward variant for Triton (its best config after a sweep), plus,
    after a sweep, ``triton tables``: the default tables and variant, the baseline."""
    if impl != "triton":
        return [(impl, None, {})]
    runs = []
    if fwd_cfg is not None or bwd_cfgs:
        runs.append(("triton tables", hstu_configs.DEFAULT_BACKWARD_VARIANT, {}))
    for variant in variants:
        label = impl if len(variants) == 1 and not runs else f"{impl} {variant}"
        runs.append((label, variant, dict(forward=fwd_cfg, backward=bwd_cfgs.get(variant), backward_variant=variant)))
    return runs


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
    parser.add_argument("--bias-paths", default="",
                        help="with --bias: time these relative-bias paths (uniform,per_pair; default: the "
                             "kernels' own choice, hstu_configs.uniform_bias_tiles)")
    parser.add_argument("--impls", default="triton,pytorch,sdpa")
    parser.add_argument("--reference-max-len", type=int, default=2048, help="longest length timed for the reference")
    parser.add_argument("--sweep", action="store_true", help="time the candidate configs at --sweep-len first and use the best")
    parser.add_argument("--sweep-len", type=int, default=8192)
    parser.add_argument("--sweep-shapes", default="", help="sweep only these shapes (default: all)")
    parser.add_argument("--bwd-variants", default=hstu_configs.DEFAULT_BACKWARD_VARIANT,
                        help="Triton backward variants to time, comma separated, of auto (the default's rule), "
                             + ",".join(hstu_configs.BACKWARD_VARIANTS))
    parser.add_argument("--kernel-times", action="store_true",
                        help="also profile one backward per Triton row: device ms of each backward kernel")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", help="write all rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    variants = args.bwd_variants.split(",")
    unknown = sorted(set(variants) - {"auto", *hstu_configs.BACKWARD_VARIANTS})
    if unknown:
        parser.error(f"--bwd-variants: unknown {unknown}; choose from auto, {', '.join(hstu_configs.BACKWARD_VARIANTS)}")
    if args.sweep and "auto" in variants:
        parser.error("--sweep needs explicit --bwd-variants (fused, split): each has its own candidates")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    rng = np.random.default_rng(0)
    rows, best = [], {}
    device = torch.cuda.get_device_name()
    for heads, d in shapes:
        if args.sweep and (not args.sweep_shapes or f"{heads}x{d}" in args.sweep_shapes.split(",")):
            best[(heads, d)] = sweep(heads, d, dtype, args.sweep_len, args, variants)
            fwd_best, bwd_best = best[(heads, d)]
            print(f"best {heads}x{d}: forward {fwd_best}; " + "; ".join(f"{v} {c}" for v, c in bwd_best.items()), flush=True)
        fwd_cfg, bwd_cfgs = best.get((heads, d), (None, {}))
        for dist in args.dists.split(","):
            for length in (int(x) for x in args.lengths.split(",")):
                lengths = [length] * max(1, args.tokens // length) if dist == "fixed" else zipf_lengths(length, args.tokens, rng)
                for mask in args.masks.split(","):
                    for bias, bias_path in _bias_cases(args):
                        for impl in args.impls.split(","):
                            if impl == "pytorch" and length > args.reference_max_len:
                                continue
                            if impl == "sdpa" and (dist != "fixed" or mask != "causal" or bias):
                                continue
                            for label, variant, overrides in _timed_configs(impl, variants, fwd_cfg, bwd_cfgs):
                                if bias_path:
                                    overrides = dict(overrides, uniform_bias_tiles=bias_path == "uniform")
                                    label = f"{label} {bias_path}"
                                with hstu_configs.override(**overrides):
                                    r = _safe(run_case, impl, lengths, heads, d, dtype, mask, bias, args)
                                row = dict(shape=f"{heads}x{d}", dist=dist, max_len=length, seqs=len(lengths),
                                           tokens=sum(lengths), mask=mask, bias=bias, impl=label, bwd_variant=variant,
                                           **(r or {}))
                                rows.append(row)
                                print(f"{row['shape']} {dist} N={length} B={len(lengths)} {mask}{' +bias' if bias else ''} {label}: "
                                      f"fwd {_fmt(r, 'fwd_tflops')} bwd {_fmt(r, 'bwd_tflops')} TFLOP/s, "
                                      f"fwd {_fmt(r, 'fwd_ms', 2)} ms bwd {_fmt(r, 'bwd_ms', 2)} ms peak {_fmt(r, 'peak_mib')} MiB"
                                      + (" | bwd kernels " + ", ".join(f"{k} {v:.2f} ms" for k, v in r["bwd_kernel_ms"].items())
                                         if r and "bwd_kernel_ms" in r else ""),
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
        chosen = {f"{h}x{d}": dict(forward=str(f), backward={v: str(c) for v, c in b.items()}) for (h, d), (f, b) in best.items()}
        Path(args.json).write_text(json.dumps(dict(device=device, args=vars(args), best=chosen, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
