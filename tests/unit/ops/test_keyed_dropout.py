"""The keyed dropout mask: a pure function of (seed, site, token key, global feature index),
so it is deterministic, changes with each key component, keeps 1 - p of the elements,
and any slice of tokens or features (micro-batches, sequence- or tensor-parallel ranks)
sees its part of one mask. Statistical bounds: Z = 5 standard deviations of the binomial
count the check makes (a false alarm about once in 3.5 million runs)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_gr.ops.keyed_dropout import DropoutKeys, keep_mask, keyed_dropout
from megatron_gr.ops.pytorch.keyed_dropout import MIX_MULTIPLIERS, mix32, stream_words

Z = 5.0
MAX_LEN = 64  # token key = sample * MAX_LEN + position, as the loader builds them
TOKENS, FEATURES = 512, 96


def token_keys(samples: int = TOKENS // MAX_LEN) -> torch.Tensor:
    return (torch.arange(samples).repeat_interleave(MAX_LEN) * MAX_LEN + torch.arange(MAX_LEN).repeat(samples))


def keys(**fields) -> DropoutKeys:
    values = dict(seed=123, site=5, token_keys=token_keys(), feature_offset=0)
    values.update(fields)
    return DropoutKeys(**values)


def python_mix32(x: int) -> int:
    """lowbias32 on Python integers (exact modulo 2^32)."""
    x ^= x >> 16
    x = (x * MIX_MULTIPLIERS[0]) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * MIX_MULTIPLIERS[1]) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_the_tensor_hash_is_exact_32_bit_arithmetic():
    """The int64 tensor version splits each product into 16-bit halves: it must equal the
    modulo-2^32 hash for words with high bits set (where a plain int64 product would
    overflow)."""
    words = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xDEADBEEF, 12345678, 0xC0FFEE00]
    words += torch.randint(0, 2**32, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    got = mix32(torch.tensor(words, dtype=torch.int64)).tolist()
    assert got == [python_mix32(w) for w in words]


def test_the_mask_is_deterministic():
    a = keep_mask(keys(), FEATURES, p=0.3)
    assert a.shape == (TOKENS, FEATURES) and a.dtype == torch.bool
    assert torch.equal(a, keep_mask(keys(token_keys=token_keys().clone()), FEATURES, p=0.3))


def agreement_bound(n: int) -> float:
    """Two independent p = 0.5 masks agree on a binomial(n, 1/2) share of elements."""
    return Z * math.sqrt(0.25 / n)


@pytest.mark.parametrize("change", ["seed", "site", "sample", "position", "feature"])
def test_the_mask_depends_on_every_key_component(change):
    """Changing one component gives a mask independent of the first: the two agree on half
    the elements (within the bound), not on all of them."""
    base = keys()
    other = {
        "seed": keys(seed=124),
        "site": keys(site=6),
        "sample": keys(token_keys=base.token_keys + MAX_LEN),  # every token moved to the next sample
        "position": keys(token_keys=base.token_keys + 1),  # and to the next position
        "feature": keys(feature_offset=FEATURES),  # the next block of features
    }[change]
    a, b = keep_mask(base, FEATURES, p=0.5), keep_mask(other, FEATURES, p=0.5)
    agree = (a == b).double().mean().item()
    assert abs(agree - 0.5) <= agreement_bound(a.numel()), agree


def test_stream_words_differ_for_neighbouring_seeds_and_sites():
    words = {stream_words(seed, site) for seed in range(20) for site in range(20)}
    assert len(words) == 400


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5, 0.9])
def test_keep_rate_is_one_minus_p(p):
    mask = keep_mask(keys(), FEATURES, p=p)
    n = mask.numel()
    rate = mask.double().mean().item()
    assert abs(rate - (1 - p)) <= Z * math.sqrt(p * (1 - p) / n) + 2**-24, rate
    # and per feature and per token the same rate: no column or row is special
    per_feature = mask.double().mean(0)
    assert (per_feature - (1 - p)).abs().max() <= Z * math.sqrt(p * (1 - p) / TOKENS) + 2**-24


def test_tensor_parallel_slices_are_slices_of_the_single_rank_mask():
    """A rank holding features [r F / tp, (r + 1) F / tp) with that feature offset draws
    exactly its columns of the full mask; a token subset (a micro-batch, a sequence-parallel
    slice, any order) draws its rows."""
    full = keep_mask(keys(), FEATURES, p=0.3)
    for tp in (2, 4):
        width = FEATURES // tp
        slices = [keep_mask(keys(feature_offset=r * width), width, p=0.3) for r in range(tp)]
        assert torch.equal(torch.cat(slices, dim=1), full)
    rows = torch.randperm(TOKENS, generator=torch.Generator().manual_seed(1))[:100]
    assert torch.equal(keep_mask(keys(token_keys=token_keys()[rows]), FEATURES, p=0.3), full[rows])


def test_dropout_scales_kept_values_and_its_gradient_follows_the_mask():
    p = 0.3
    x = torch.randn(TOKENS, 4, FEATURES // 4, dtype=torch.float64, requires_grad=True)
    out = keyed_dropout(x, keys(), p=p, training=True)
    keep = keep_mask(keys(), FEATURES, p=p).view_as(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, torch.where(keep, x / (1 - p), 0.0))
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    torch.testing.assert_close(grad, keep.double() / (1 - p))
    # a tensor-parallel slice of the features: the same values as the slice of the whole
    half = keyed_dropout(x.reshape(TOKENS, -1)[:, FEATURES // 2 :], keys(feature_offset=FEATURES // 2), p=p,
                         training=True)
    torch.testing.assert_close(half, out.reshape(TOKENS, -1)[:, FEATURES // 2 :])


def test_identity_unless_training_with_p_above_zero():
    x = torch.randn(5, 3)
    assert keyed_dropout(x, None, p=0.5, training=False) is x
    assert keyed_dropout(x, None, p=0.0, training=True) is x


@pytest.mark.parametrize("bad, match", [
    (None, "needs the tokens' DropoutKeys"),
    (keys(token_keys=torch.arange(4)), r"token_keys must be a \[5\] int64 tensor"),
    (keys(token_keys=torch.arange(5, dtype=torch.int32)), r"token_keys must be a \[5\] int64 tensor"),
    (keys(token_keys=torch.arange(5), feature_offset=-1), "feature_offset=-1"),
])
def test_bad_keys_are_one_line_errors(bad, match):
    with pytest.raises(ValueError, match=match) as info:
        keyed_dropout(torch.randn(5, 3), bad, p=0.5, training=True)
    assert "\n" not in str(info.value)


def test_p_must_be_below_one():
    with pytest.raises(ValueError, match=r"dropout_p=1.0 must be in \[0, 1\)"):
        keyed_dropout(torch.randn(5, 3), keys(token_keys=torch.arange(5)), p=1.0, training=True)
