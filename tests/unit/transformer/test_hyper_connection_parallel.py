"""A block of hyper-connection transformer layers on 2 gloo ranks against one rank: TP=2
with and without sequence parallelism, DP=2 under megatron's DistributedDataParallel, and a
checkpoint saved under TP=2 loaded under TP=1. (STU layers are not tensor-parallel as they
stand: their attention-output norm spans all heads; that belongs to the parallelism work.)

The single-rank reference (weights, input, output, gradients) is computed here and written
to a file; each of 2 ranks (``hyper_connection_ranks.check_layouts``) loads its shard of the
weights, runs forward and backward and compares its part of the output and of every
gradient with the reference.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.multirank import run_ranks
from tests.unit.transformer.hyper_connection_ranks import (
    B,
    C,
    S,
    WORLD,
    block_config,
    build_block,
    forward_backward,
    loss_weights,
)


def reference_run(block, x) -> dict:
    with torch.no_grad():  # non-trivial biases and norms
        for name, p in block.named_parameters():
            if "bias" in name or "layernorm" in name or name.endswith("alpha"):
                p.add_(0.1 * torch.randn_like(p))
    out, dx = forward_backward(block, x, loss_weights(x.shape))
    return {
        "weights": {k: v.detach().clone() for k, v in block.state_dict().items() if isinstance(v, torch.Tensor)},
        "grads": {n: p.grad.clone() for n, p in block.named_parameters()},
        "x": x, "out": out, "dx": dx,
    }


@pytest.mark.slow
def test_parallel_layouts_match_one_rank(megatron_cpu, tmp_path):
    torch.manual_seed(11)
    reference = reference_run(build_block(block_config()), torch.randn(S, B, C))
    torch.save(reference, tmp_path / "reference.pt")

    run_ranks(WORLD, "tests.unit.transformer.hyper_connection_ranks:check_layouts", str(tmp_path), workdir=tmp_path)

    # The TP=2 checkpoint loads into this one-rank block.
    from megatron.core import dist_checkpointing

    fresh = build_block(block_config())
    loaded = dist_checkpointing.load({"model": fresh.sharded_state_dict()}, str(tmp_path / "tp2_checkpoint"))
    fresh.load_state_dict(loaded["model"])
    for key, value in reference["weights"].items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0, msg=key)
