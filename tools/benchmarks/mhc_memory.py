#!/usr/bin/env python3
"""Activation memory of a block of layers with hyper-connections, with and without mHC
recompute: the bytes held between forward and backward, and the peak over forward +
backward, both above what existed before the forward (weights, inputs).

    python tools/benchmarks/mhc_memory.py [--layer stu|transformer] [--layers 4] [--hidden 32]
        [--streams 4] [--tokens 128] [--device cpu|cuda] [--backend pytorch|triton]

``--backend triton`` (CUDA) builds the blocks on the fused kernels, which also fuse each
merge with the next pre op, the expansion and the contraction (the n copies of the block
input and the last merged streams are never made).

CUDA reads the allocator's statistics. The CPU keeps none, so there the live tensor storages
created during the run are summed after every op (storages freed by the recompute manager
count 0 bytes until refilled).
"""

from __future__ import annotations

import argparse
import sys

import torch


def measure(block, x, kwargs, device) -> tuple[int, int]:
    torch.manual_seed(0)
    x = x.clone().requires_grad_()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = block(x, **kwargs)
        held = torch.cuda.memory_allocated() - base
        out.float().square().sum().backward()
        torch.cuda.synchronize()
        return held, torch.cuda.max_memory_allocated() - base
    from megatron_gr.training.live_memory import LiveTensorBytes

    tracker = LiveTensorBytes()
    with tracker:
        out = block(x, **kwargs)
        held = tracker.current()
        out.float().square().sum().backward()
    return held, tracker.peak


def main() -> int:
    from megatron_gr.config import GRTransformerConfig, TrainingConfig
    from megatron_gr.training.runtime import initialize, shutdown
    from megatron_gr.transformer.jagged_seq_params import JaggedSeqParams
    from megatron_gr.transformer.specs import get_stu_block_spec, get_transformer_block_spec

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", choices=("stu", "transformer"), default="stu")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per batch (sequences of up to 64)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", choices=("pytorch", "triton"), default="pytorch", help="kernels of the mHC ops")
    args = parser.parse_args()
    runtime = initialize(TrainingConfig(device=args.device, seed=1))
    device = runtime.device

    def build(**overrides):
        values = dict(
            num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=2, qk_head_dim=args.hidden // 4,
            v_head_dim=args.hidden // 4, max_seq_len=64, hidden_dropout=0.2, ffn_hidden_size=args.hidden,
            use_cpu_initialization=True, num_residual_streams=args.streams, bf16=runtime.bf16,
            params_dtype=runtime.params_dtype,
        )
        values.update(overrides)
        config = GRTransformerConfig(**values)
        spec = (get_stu_block_spec(config, backend=args.backend) if args.layer == "stu"
                else get_transformer_block_spec(config, backend=args.backend))
        return spec.module(config, spec).to(device)

    g = torch.Generator().manual_seed(0)
    if args.layer == "stu":
        lengths = torch.randint(8, 65, (max(1, args.tokens // 36),), generator=g)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(device)
        params = JaggedSeqParams.from_offsets(offsets, int(lengths.max()), timestamps=torch.arange(int(offsets[-1]), device=device))
        x = torch.randn(int(offsets[-1]), 1, args.hidden, generator=g).to(device, runtime.params_dtype)
        kwargs = {"attention_mask": None, "packed_seq_params": params}
    else:
        x = torch.randn(args.tokens // 4, 4, args.hidden, generator=g).to(device, runtime.params_dtype)
        kwargs = {"attention_mask": None}

    mhc = {"enable_hyper_connections": True}
    variants = [("without mHC", {}), ("mHC", mhc)]
    for size in range(1, args.layers + 1):
        variants.append((f"mHC, recompute blocks of {size}", {
            **mhc, "recompute_granularity": "selective", "recompute_modules": ["mhc"], "mhc_recompute_layer_num": size,
        }))
    print(f"{args.layer} block: {args.layers} layers, hidden {args.hidden}, n = {args.streams}, "
          f"{x.shape[0] * x.shape[1]} tokens, {device.type}, {runtime.params_dtype}, {args.backend} kernels")
    reference = None
    for name, overrides in variants:
        held, peak = measure(build(**overrides), x, kwargs, device)
        if name == "mHC":
            reference = (held, peak)
        note = ""
        if reference is not None and name != "mHC":
            note = f"   ({held / reference[0] - 1:+.0%} held, {peak / reference[1] - 1:+.0%} peak vs mHC)"
        print(f"  {name:32s} held {held / 2**20:8.2f} MiB   peak {peak / 2**20:8.2f} MiB{note}")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
