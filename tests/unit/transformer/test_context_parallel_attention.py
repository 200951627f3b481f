"""HSTU attention split over context-parallel ranks (simulated in one process, float64
reference): the ranks' outputs put together equal the unsplit attention, and so do the
gradients of q, k, v and the relative-bias weights, for every mask, for split chunks and
whole sequences in one batch, several group sizes and both normalisers. The backward entry
point that the exchange uses (``hstu_attention_backward``) equals autograd."""

from __future__ import annotations

import pytest
import torch

from megatron_gr.ops.hstu_attention import hstu_attention, hstu_attention_backward
from megatron_gr.ops.relative_bias import RelativeBiasInputs
from megatron_gr.transformer.context_parallel import plan_context_split
from tests.unit.transformer.context_parallel_helpers import MASKS, key_layout_of, offsets_of, split_attention

LENGTHS = [1, 37, 5, 64, 0, 23, 9]  # 37, 64, 23 split at threshold 12; the rest whole


def make_inputs(lengths, *, bias: bool, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k = (torch.randn(total, 2, 6, generator=g, dtype=dtype).requires_grad_() for _ in range(2))
    v = torch.randn(total, 2, 5, generator=g, dtype=dtype).requires_grad_()
    rel = None
    if bias:
        # Gaps hit small buckets and, now and then, the last one.
        gaps = torch.randint(0, 30, (total,), generator=g) + (torch.rand(total, generator=g) < 0.05) * 10**7
        rel = RelativeBiasInputs(
            position_weights=torch.randn(9, generator=g, dtype=dtype).requires_grad_(),
            time_weights=torch.randn(7, generator=g, dtype=dtype).requires_grad_(),
            timestamps=torch.cumsum(gaps, 0),
            time_bucket_fn="sqrt" if seed % 2 == 0 else "log",
        )
    return q, k, v, rel


def attention_kwargs(lengths, mask: dict, normalizer: str) -> dict:
    mask = dict(mask)
    targets = torch.tensor([min(3, n // 2) for n in lengths]) if mask.pop("targets", False) else None
    return dict(max_seq_len=70, alpha=0.4, normalizer=normalizer, num_targets=targets, **mask)


@pytest.mark.parametrize("mask", MASKS, ids=list(MASKS))
@pytest.mark.parametrize("size, normalizer, bias", [(2, "max_seq_len", True), (3, "seq_len", True), (4, "max_seq_len", False)])
def test_split_over_ranks_equals_whole(mask, size, normalizer, bias):
    q, k, v, rel = make_inputs(LENGTHS, bias=bias, seed=size)
    kwargs = attention_kwargs(LENGTHS, MASKS[mask], normalizer)
    whole = hstu_attention(q, k, v, offsets_of(LENGTHS), relative_bias=rel, **kwargs)
    split = split_attention(q, k, v, LENGTHS, size=size, threshold=12, relative_bias=rel, **kwargs)
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-12)
    leaves = [q, k, v] + ([rel.position_weights, rel.time_weights] if rel is not None else [])
    grad = torch.randn_like(whole)
    want = torch.autograd.grad(whole, leaves, grad)
    got = torch.autograd.grad(split, leaves, grad)
    for name, a, b in zip(["dq", "dk", "dv", "d_position", "d_time"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=name)


@pytest.mark.parametrize("mask", ["causal", "all", "bidirectional_all"])
def test_backward_entry_point_equals_autograd(mask):
    """What the context-parallel autograd function calls in its backward: the gradients of
    the key-layout attention from its inputs alone."""
    q, k, v, rel = make_inputs(LENGTHS, bias=True, seed=5)
    plan = plan_context_split(LENGTHS, size=2, rank=1, split_threshold=12, causal=MASKS[mask].get("causal", True),
                              contextual_len=MASKS[mask].get("contextual_len", 0))
    tokens, keys = torch.from_numpy(plan.token_index), torch.from_numpy(plan.key_token)
    kwargs = attention_kwargs(LENGTHS, MASKS[mask], "seq_len")
    if kwargs["num_targets"] is not None:
        kwargs["num_targets"] = kwargs["num_targets"][torch.from_numpy(plan.segment_sequence)]
    local_bias = RelativeBiasInputs(rel.position_weights, rel.time_weights, rel.timestamps[tokens], rel.time_bucket_fn)
    inputs = [t.detach()[index].requires_grad_() for t, index in ((q, tokens), (k, keys), (v, keys))]
    args = dict(kwargs, relative_bias=local_bias, key_layout=key_layout_of(plan, rel.timestamps))
    offsets = offsets_of(plan.segment_length)
    out = hstu_attention(*inputs, offsets, **args)
    grad = torch.randn_like(out)
    want = torch.autograd.grad(out, inputs + [rel.position_weights, rel.time_weights], grad)
    got = hstu_attention_backward(grad, *[t.detach() for t in inputs], offsets, **args)
    for name, a, b in zip(["dq", "dk", "dv", "d_position", "d_time"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_key_layout_is_checked():
    q, k, v, rel = make_inputs([4, 6], bias=True, seed=0)
    plan = plan_context_split([4, 6], size=2, rank=0, split_threshold=4)
    layout = key_layout_of(plan, None)  # no key timestamps, but a relative bias
    tokens = torch.from_numpy(plan.token_index)
    local_bias = RelativeBiasInputs(rel.position_weights, rel.time_weights, rel.timestamps[tokens])
    keys = torch.from_numpy(plan.key_token)
    with pytest.raises(ValueError, match="int64 key_timestamps"):
        hstu_attention(q[tokens], k[keys], v[keys], offsets_of(plan.segment_length), max_seq_len=10, alpha=1.0,
                       relative_bias=local_bias, key_layout=layout)
    with pytest.raises(ValueError, match="v must be"):
        hstu_attention(q[tokens], k[keys], v[keys][:-1], offsets_of(plan.segment_length), max_seq_len=10, alpha=1.0,
                       key_layout=layout)
