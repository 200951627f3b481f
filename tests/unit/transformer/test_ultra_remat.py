"""Selective rematerialization (``recompute_uvqk``, ``recompute_normed_x``) gives the
gradients of the plain layers bit for bit and keeps fewer activation bytes for the
backward: with U, V, Q, K recomputed at least one ``[T, heads x (2 dv + 2 dqk)]`` tensor
per layer less (the SiLU input too), with the norm recomputed one ``[T, C]`` more."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_gr.data.ranking.channel_batches import make_channel_batch
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
    model, dataset = build(config)
    model.train()
    batch = make_channel_batch(dataset.channels, chunk, key_base=chunk, dropout_seed=3)
    losses, held = held_for_backward(lambda: model(batch))
    losses.sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}, held, batch


@pytest.mark.parametrize("hyper_connections", [False, True])
def test_rematerialization_gives_identical_gradients_and_keeps_fewer_bytes(megatron_cpu, tmp_path, hyper_connections):
    chunk = np.arange(12)
    base = {"transducers": [{}], "enable_hyper_connections": hyper_connections, "num_residual_streams": 2}
    grads, plain, batch = step(tiny(tmp_path, model=base), chunk)
    flags = {"recompute_uvqk": True} if hyper_connections else {"recompute_uvqk": True, "recompute_normed_x": True}
    remat_grads, remat, _ = step(tiny(tmp_path, model={**base, **flags}), chunk)
    assert grads.keys() == remat_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(remat_grads[name], grad), name
    tokens, layers = batch.num_tokens, 2
    uvqk_bytes = tokens * 2 * (2 * 8 + 2 * 8) * 4  # heads x (2 dv + 2 dqk), fp32
    normed_bytes = 0 if hyper_connections else tokens * 16 * 4
    assert remat <= plain - layers * (uvqk_bytes + normed_bytes), (plain, remat)


def test_uvqk_rematerialization_alone_and_with_truncation(megatron_cpu, tmp_path):
    chunk = np.arange(10)
    base = {"attn_truncation_split_layer": 1, "attn_truncation_tail_len": 2}
    grads, plain, _ = step(tiny(tmp_path, model=base), chunk)
    remat_grads, remat, _ = step(tiny(tmp_path, model={**base, "recompute_uvqk": True}), chunk)
    for name, grad in grads.items():
        assert torch.equal(remat_grads[name], grad), name
    assert remat < plain
