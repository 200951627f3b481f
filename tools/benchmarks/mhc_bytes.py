#!/usr/bin/env python3
"""Bytes the mHC kernels move between two sublayers, counted from what each kernel reads
and writes in device memory (analytic: the reads of every input and writes of every output
the kernels do, not a profile), before and after the fused merge pairs.

    python tools/benchmarks/mhc_bytes.py [--streams 4] [--channels 1024] [--tokens 65536]
        [--dtype bf16] [--layers 8]

Per sublayer (a merge and the next sublayer's pre op, forward and backward):

- before: the merge (x and y read, x' written), the pre op (x' read by the mappings and
  by the aggregate; backward: x' read by the gates kernel and by the projection
  backward, its dx written), and autograd's add of the two gradients of x' (the pre op's
  and the next merge's: two reads, a write) ahead of the merge's backward (x and that sum
  read, dx written);
- after (``mhc_merge_pre``): one forward walk reads x and y and writes x' (its maps on
  the way), the aggregate reads x' once more (it needs H_pre, known only after the whole
  token); the backward's gates kernel reads x (x' recomputed) and one kernel reads x and
  the gradient of x' and writes dx.

Per block of L sublayers: L - 1 such pairs and the two ends. Before: the expansion (the n
copies written; backward: their gradient read), the first pre op on the copies (and the
add of their two gradients), the last merge and the contraction (the last streams
written and read; backward: their gradient written and read). After: the first pre op
reads the block input, so does the first merge (``mhc_expand_pre``, ``mhc_merge_pre`` on
[T, C]), and the last merge writes the mean (``mhc_merge_contract``).

Units: S = one pass over the streams (T n C values), H = one pass over a [T, C] tensor
(y, u, their gradients, the block input and output), maps (float32 ``[T, n² + 2n]`` and
smaller) counted apart. With dropout every merge kernel also reads the int64 token keys
of the keyed mask (8 bytes per token and kernel, 0.1% of a pass over the streams at
n = 4, C = 1024 in bf16), left out here.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Passes:
    """Passes of one kernel (or a group of kernels) over the streams and over [T, C] tensors."""

    streams: int
    hidden: int

    def __add__(self, other: "Passes") -> "Passes":
        return Passes(self.streams + other.streams, self.hidden + other.hidden)


# Per sublayer, kernel by kernel: (name, forward passes, backward passes).
SEPARATE = (
    ("merge", Passes(2, 1), Passes(3, 2)),  # fwd: x, y read, x' written; bwd: x, G, y read, dx, dy written
    ("pre: mappings + aggregate", Passes(2, 1), Passes(0, 0)),  # x' read twice, u written
    ("pre: gates + projection backward", Passes(0, 0), Passes(3, 2)),  # x' read twice, du twice, dx written
    ("autograd add of the two gradients of x'", Passes(0, 0), Passes(3, 0)),
)
FUSED = (
    ("merge_pre: merge + mappings", Passes(2, 1), Passes(0, 0)),  # x, y read, x' written
    ("merge_pre: aggregate", Passes(1, 1), Passes(0, 0)),  # x' read, u written
    ("merge_pre: gates", Passes(0, 0), Passes(1, 2)),  # x read (x' recomputed), y and du read
    ("merge_pre: merge + pre backward", Passes(0, 0), Passes(3, 3)),  # x, G, y, du read; dx, dy written
)
# A block of L sublayers: L - 1 merge-pre pairs and its two ends.
BLOCK_SEPARATE_ENDS = (
    ("expand: n copies written (bwd: their gradient read, the sum written)", Passes(1, 1), Passes(1, 1)),
    ("pre op of the first sublayer on the copies", Passes(2, 1), Passes(3, 2)),
    ("autograd add of the two gradients of the copies", Passes(0, 0), Passes(3, 0)),
    ("merge of the last sublayer", Passes(2, 1), Passes(3, 2)),
    ("contract: streams read, mean written (bwd: n copies written)", Passes(1, 1), Passes(1, 1)),
)
# With the fused ops the first pair's merge reads the block input instead of its copies.
FIRST_PAIR_FUSED = (
    ("merge_pre on the block input: merge + mappings", Passes(1, 2), Passes(0, 0)),
    ("merge_pre on the block input: aggregate", Passes(1, 1), Passes(0, 0)),
    ("merge_pre on the block input: gates", Passes(0, 0), Passes(0, 3)),
    ("merge_pre on the block input: merge + pre backward", Passes(0, 0), Passes(1, 5)),  # G read, the rest [T, C]
)
BLOCK_FUSED_ENDS = (
    ("expand_pre: the first pre op on the block input", Passes(0, 3), Passes(0, 5)),
    ("autograd add of the two gradients of the block input", Passes(0, 0), Passes(0, 3)),
    ("merge_contract: the last merge writes the mean", Passes(1, 2), Passes(2, 3)),
)


def total(rows) -> tuple[Passes, Passes]:
    forward, backward = Passes(0, 0), Passes(0, 0)
    for _, fwd, bwd in rows:
        forward, backward = forward + fwd, backward + bwd
    return forward, backward


def to_bytes(passes: Passes, *, tokens: int, streams: int, channels: int, itemsize: int) -> int:
    return tokens * channels * itemsize * (passes.streams * streams + passes.hidden)


def sublayer_bytes(*, tokens: int, streams: int, channels: int, itemsize: int) -> dict:
    """``{"before": (fwd, bwd), "after": (fwd, bwd)}`` bytes of one merge-pre pair (maps
    excluded)."""
    size = dict(tokens=tokens, streams=streams, channels=channels, itemsize=itemsize)
    return {name: tuple(to_bytes(p, **size) for p in total(rows)) for name, rows in
            (("before", SEPARATE), ("after", FUSED))}


def block_rows(layers: int) -> dict:
    """Every kernel of a block of ``layers >= 2`` sublayers, before and after."""
    if layers < 2:
        raise ValueError(f"layers={layers}: the block model needs at least 2 sublayers")
    return {
        "before": (layers - 1) * SEPARATE + BLOCK_SEPARATE_ENDS,
        "after": FIRST_PAIR_FUSED + (layers - 2) * FUSED + BLOCK_FUSED_ENDS,
    }


def block_bytes(*, layers: int, tokens: int, streams: int, channels: int, itemsize: int) -> dict:
    """``{"before": bytes, "after": bytes}`` of a block of ``layers`` sublayers, forward plus
    backward, maps excluded."""
    size = dict(tokens=tokens, streams=streams, channels=channels, itemsize=itemsize)
    return {name: to_bytes(sum(total(rows), Passes(0, 0)), **size) for name, rows in block_rows(layers).items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--layers", type=int, default=8, help="sublayers of the block (8 STU layers: 8), >= 2")
    parser.add_argument("--bandwidth", type=float, default=2.8, help="TB/s for the time column (H100: ~2.8)")
    args = parser.parse_args()
    size = dict(tokens=args.tokens, streams=args.streams, channels=args.channels,
                itemsize=2 if args.dtype == "bf16" else 4)
    print(f"n = {args.streams}, C = {args.channels}, {args.tokens} tokens, {args.dtype} streams; "
          f"S = one pass over the streams ({to_bytes(Passes(1, 0), **size) / 1e6:.0f} MB), "
          f"H = one pass over [T, C] ({to_bytes(Passes(0, 1), **size) / 1e6:.0f} MB)\n")
    print("| per sublayer | kernel | fwd | bwd |")
    print("|---|---|---|---|")
    for name, rows in (("before", SEPARATE), ("after", FUSED)):
        for kernel, fwd, bwd in rows:
            print(f"| {name} | {kernel} | {fwd.streams} S + {fwd.hidden} H | {bwd.streams} S + {bwd.hidden} H |")
        fwd, bwd = total(rows)
        print(f"| {name} | **total** | **{fwd.streams} S + {fwd.hidden} H** | **{bwd.streams} S + {bwd.hidden} H** |")
    for name, rows in (("block ends, before", BLOCK_SEPARATE_ENDS), ("block ends, after", BLOCK_FUSED_ENDS),
                       ("first pair, after", FIRST_PAIR_FUSED)):
        for kernel, fwd, bwd in rows:
            print(f"| {name} | {kernel} | {fwd.streams} S + {fwd.hidden} H | {bwd.streams} S + {bwd.hidden} H |")
    per = sublayer_bytes(**size)
    block = block_bytes(layers=args.layers, **size)
    print()
    print(f"| | before | after | saved | at {args.bandwidth} TB/s before / after |")
    print("|---|---|---|---|---|")
    for label, before, after in (
        ("per sublayer, fwd + bwd", sum(per["before"]), sum(per["after"])),
        (f"block of {args.layers} sublayers with expand and contract", block["before"], block["after"]),
    ):
        print(f"| {label} | {before / 1e9:.2f} GB | {after / 1e9:.2f} GB | {1 - after / before:.0%} | "
              f"{before / args.bandwidth / 1e6:.0f} / {after / args.bandwidth / 1e6:.0f} us |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
