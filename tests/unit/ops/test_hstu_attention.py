"""The jagged reference against a per-sequence dense implementation whose mask is written
out rule by rule, on random lengths (1 included), masks and dtypes."""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_gr.ops.attention_mask import attention_mask
from megatron_gr.ops.hstu_attention import hstu_attention
from megatron_gr.ops.relative_bias import RelativeBiasInputs
from tests.unit.ops.attention_reference import dense_attention, relative_bias_pairs, rule_mask


def random_inputs(lengths, heads, dqk, dv, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, heads, dqk, generator=g).to(dtype).requires_grad_()
    k = torch.randn(total, heads, dqk, generator=g).to(dtype).requires_grad_()
    v = torch.randn(total, heads, dv, generator=g).to(dtype).requires_grad_()
    offsets = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64)
    return q, k, v, offsets


CASES = [
    dict(causal=True, window=0, contextual=0, with_targets=False, normalizer="max_seq_len", bias=False),
    dict(causal=True, window=3, contextual=0, with_targets=False, normalizer="max_seq_len", bias=True),
    dict(causal=True, window=0, contextual=2, with_targets=False, normalizer="seq_len", bias=False),
    dict(causal=True, window=0, contextual=0, with_targets=True, normalizer="max_seq_len", bias=True),
    dict(causal=True, window=2, contextual=1, with_targets=True, normalizer="seq_len", bias=True),
    dict(causal=False, window=0, contextual=0, with_targets=False, normalizer="max_seq_len", bias=False),
    dict(causal=False, window=2, contextual=0, with_targets=True, normalizer="max_seq_len", bias=False),
    # semi-local attention: window k1 plus a global prefix of k2 tokens
    dict(causal=True, window=2, prefix=4, contextual=0, with_targets=False, normalizer="max_seq_len", bias=True),
    dict(causal=True, window=1, prefix=3, contextual=2, with_targets=True, normalizer="seq_len", bias=False),
    dict(causal=False, window=2, prefix=3, contextual=1, with_targets=True, normalizer="max_seq_len", bias=True),
]


def random_relative_bias(lengths, g, time_fn="sqrt"):
    ts = torch.cat([torch.sort(torch.randint(0, 60, (n,), generator=g))[0] for n in lengths])
    return RelativeBiasInputs(
        position_weights=torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True),
        time_weights=torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True),
        timestamps=ts,
        time_bucket_fn=time_fn,
    )


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_matches_dense_forward_and_backward(case, seed):
    g = torch.Generator().manual_seed(100 + seed)
    lengths = [1, *torch.randint(1, 12, (4,), generator=g).tolist(), 11]
    q, k, v, offsets = random_inputs(lengths, heads=2, dqk=8, dv=6, dtype=torch.float64, seed=seed)
    targets = torch.tensor([min(2, n - 1) if n > 1 else 0 for n in lengths]) if case["with_targets"] else None
    rel = random_relative_bias(lengths, g, time_fn="sqrt" if seed == 0 else "log") if case["bias"] else None
    kwargs = dict(alpha=0.3, max_seq_len=16, normalizer=case["normalizer"], causal=case["causal"])
    prefix = case.get("prefix", 0)
    out = hstu_attention(
        q, k, v, offsets, **kwargs, max_attn_len=case["window"], contextual_len=case["contextual"],
        num_targets=targets, global_prefix_len=prefix, relative_bias=rel,
    )
    expected = dense_attention(
        q, k, v, lengths, **kwargs, window=case["window"], contextual=case["contextual"],
        targets=targets.tolist() if targets is not None else None,
        bias=relative_bias_pairs(rel, lengths) if rel is not None else None, prefix=prefix,
    )
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    grad = torch.randn_like(out)
    leaves = (q, k, v) + ((rel.position_weights, rel.time_weights) if rel is not None else ())
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(expected, leaves, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_vectorised_mask_equals_rules():
    lengths = torch.tensor([1, 4, 7])
    targets = torch.tensor([0, 1, 3])
    for causal, window, contextual, prefix in itertools.product([True, False], [0, 1, 3], [0, 2], [0, 3]):
        mask = attention_mask(
            lengths, 7, causal=causal, max_attn_len=window, contextual_len=contextual, num_targets=targets,
            global_prefix_len=prefix,
        )
        for b, n in enumerate(lengths.tolist()):
            want = rule_mask(n, causal=causal, window=window, contextual=contextual, targets=int(targets[b]), prefix=prefix)
            assert torch.equal(mask[b, :n, :n], want)
            assert not mask[b, n:].any() and not mask[b, :, n:].any()


def test_bf16_inputs_accumulate_in_fp32():
    q, k, v, offsets = random_inputs([5, 1, 9], heads=2, dqk=16, dv=16, dtype=torch.bfloat16, seed=3)
    out = hstu_attention(q, k, v, offsets, alpha=0.25, max_seq_len=9)
    assert out.dtype == torch.bfloat16
    expected = dense_attention(
        q, k, v, [5, 1, 9], alpha=0.25, max_seq_len=9, normalizer="max_seq_len", causal=True,
        window=0, contextual=0, targets=None, bias=None,
    )
    error = (out.double() - expected).norm() / expected.norm()
    assert error < 1e-2


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(kernel="cutlass"), "kernel='cutlass'"),
        (dict(normalizer="sum"), "normalizer='sum'"),
    ],
)
def test_bad_arguments(change, words):
    q, k, v, offsets = random_inputs([3], heads=1, dqk=4, dv=4, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match=words):
        hstu_attention(q, k, v, offsets, alpha=1.0, max_seq_len=4, **change)


def test_mismatched_shapes():
    q, k, v, offsets = random_inputs([3], heads=1, dqk=4, dv=4, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="v must be"):
        hstu_attention(q, k, v[:, :, None], offsets, alpha=1.0, max_seq_len=4)


def test_triton_kernel_refused_where_it_cannot_run(monkeypatch):
    """No silent fallback: without triton, or on CPU outside the interpreter, asking for the
    Triton kernel is an error that says what to do."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, offsets = random_inputs([3], heads=1, dqk=4, dv=4, dtype=torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="needs the triton package|CUDA devices only"):
        hstu_attention(q, k, v, offsets, alpha=1.0, max_seq_len=4, kernel="triton")


def test_bad_relative_bias_inputs():
    q, k, v, offsets = random_inputs([3, 2], heads=1, dqk=4, dv=4, dtype=torch.float32, seed=0)
    rel = RelativeBiasInputs(torch.zeros(4), torch.zeros(3), torch.zeros(5, dtype=torch.int32))
    with pytest.raises(ValueError, match="timestamps must be int64"):
        hstu_attention(q, k, v, offsets, alpha=1.0, max_seq_len=4, relative_bias=rel)
