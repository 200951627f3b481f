"""ULTRA-HSTU with hyper-connections in blocks that fuse their mHC ops across layers (the
Triton backend's default, forced here on the CPU's references, whose fused ops are the
separate ones in sequence): attention truncation re-packs the token rows at the layer after
the split, so the merge left pending by the layer before runs first, on the rows it was
computed for. Losses and every gradient equal those of blocks that do not fuse (to float32
rounding: autograd adds some gradients in another order; a merge on the wrong rows, or
missing, would move them by order one)."""

from __future__ import annotations

import numpy as np

from megatron_gr.data.ranking.channel_batches import make_channel_batch
from megatron_gr.transformer.hyper_connection_block import HyperConnectionTransformerBlock
from tests.unit.models.test_ultra_model import CLICK, IMP, TWO_CHANNELS, build, tiny


def test_truncation_after_a_pending_merge(megatron_cpu, tmp_path):
    model = {"transducers": TWO_CHANNELS, "enable_hyper_connections": True, "num_residual_streams": 2,
             "hidden_dropout": 0.2, "embedding_dropout": 0.2}
    config = tiny(tmp_path, model=model, features={**IMP, **CLICK})
    results = {}
    for fuse in (False, True):
        ultra, dataset = build(config)  # keyed initialisation: the same weights
        blocks = [m for m in ultra.modules() if isinstance(m, HyperConnectionTransformerBlock)]
        assert len(blocks) == 2
        for block in blocks:
            block.fuse_merges = fuse
        chunk = np.arange(6)
        batch = make_channel_batch(dataset.channels, chunk, key_base=chunk, dropout_seed=11)
        losses = ultra(batch)
        losses.sum().backward()
        results[fuse] = [losses, *(p.grad for p in ultra.parameters())]
    for i, (got, want) in enumerate(zip(results[True], results[False])):
        error = ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)).item()
        assert error < 1e-5, f"result {i}: relative error {error:.1e}"  # float32 sums in another order
