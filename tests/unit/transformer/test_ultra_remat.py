"""Selective rematerialization (``recompute_uvqk``, ``recompute_normed_x``) gives the
gradients of the plain layers bit for bit and keeps fewer activation bytes for the
backward (with U, V, Q, K recomputed at least one ``[T, heads x (2 dv + 2 dqk)]`` tensor
per layer less, with the norm recomputed one ``[T, C]`` more) and a lower peak of live
tensor bytes over the step (``training/live_memory.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_gr.data.ranking.channel_batches import make_channel_batch
from megatron_gr.training.live_memory import LiveTensorBytes
from tests.unit.models.test_ultra_model import build, tiny


def held_for_backward(run):
    """``run()``'s result and the bytes of the distinct storages autograd keeps for the
    backward once the forward is done (freed, i.e. rematerialized, storages count 0)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages.setdefault(storage.data_ptr(), storage)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    return out, sum(storage.nbytes() for storage in storages.values())


def step(config, chunk):
    """Gradients, bytes held for the backward, the batch, and the peak of live tensor bytes
    over the forward and backward (``LiveTensorBytes``)."""
    model, dataset = build(config)
    model.train()
    batch = make_channel_batch(dataset.channels, chunk, key_base=chunk, dropout_seed=3)
    with LiveTensorBytes() as live:
        losses, held = held_for_backward(lambda: model(batch))
        losses.sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}, held, batch, live.peak


@pytest.mark.parametrize("hyper_connections", [False, True])
def test_rematerialization_gives_identical_gradients_and_keeps_fewer_bytes(megatron_cpu, tmp_path, hyper_connections):
    chunk = np.arange(12)
    base = {"transducers": [{}], "enable_hyper_connections": hyper_connections, "num_residual_streams": 2}
    grads, plain, batch, plain_peak = step(tiny(tmp_path, model=base), chunk)
    flags = {"recompute_uvqk": True} if hyper_connections else {"recompute_uvqk": True, "recompute_normed_x": True}
    remat_grads, remat, _, remat_peak = step(tiny(tmp_path, model={**base, **flags}), chunk)
    assert grads.keys() == remat_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(remat_grads[name], grad), name
    tokens, layers = batch.num_tokens, 2
    uvqk_bytes = tokens * 2 * (2 * 8 + 2 * 8) * 4  # heads x (2 dv + 2 dqk), fp32
    normed_bytes = 0 if hyper_connections else tokens * 16 * 4
    assert remat <= plain - layers * (uvqk_bytes + normed_bytes), (plain, remat)
    assert remat_peak < plain_peak, (plain_peak, remat_peak)


def test_uvqk_rematerialization_alone_and_with_truncation(megatron_cpu, tmp_path):
    chunk = np.arange(10)
    base = {"attn_truncation_split_layer": 1, "attn_truncation_tail_len": 2}
    grads, plain, _, plain_peak = step(tiny(tmp_path, model=base), chunk)
    remat_grads, remat, _, remat_peak = step(tiny(tmp_path, model={**base, "recompute_uvqk": True}), chunk)
    for name, grad in grads.items():
        assert torch.equal(remat_grads[name], grad), name
    # Held bytes drop; the step's peak need not here: the replay of the first (full-length)
    # layer briefly holds its recomputed U, V, Q, K beside the refilled storage and the SiLU
    # input, while the truncated second layer frees little (seen: +4% on this tiny model).
    assert remat < plain
