"""The histogram backward of bucket_lookup equals autograd through plain indexing."""

from __future__ import annotations

import pytest
import torch

from megatron_gr.ops.bucket_lookup import bucket_lookup


def test_forward_and_gradient_match_indexing():
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.randint(0, 7, (3, 5, 5), generator=g)
    grad = torch.randn(3, 5, 5, dtype=torch.float64, generator=g)
    out = bucket_lookup(weights, ids)
    assert torch.equal(out, weights[ids])
    (got,) = torch.autograd.grad(out, weights, grad)
    (want,) = torch.autograd.grad(weights[ids], weights, grad)
    torch.testing.assert_close(got, want)


def test_unused_buckets_get_zero_gradient():
    weights = torch.zeros(5, requires_grad=True)
    bucket_lookup(weights, torch.tensor([1, 1, 3])).sum().backward()
    assert weights.grad.tolist() == [0.0, 2.0, 0.0, 1.0, 0.0]


def test_float32_gradient_is_the_weighted_histogram_bit_for_bit():
    """The same sums in the same order as ``bincount`` on the CPU (what the reference's
    numbers were before the backward stopped using it)."""
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(300, requires_grad=True)
    ids = torch.randint(0, 300, (64, 32, 32), generator=g)
    grad = torch.randn(64, 32, 32, generator=g)
    (got,) = torch.autograd.grad(bucket_lookup(weights, ids), weights, grad)
    assert torch.equal(got, torch.bincount(ids.reshape(-1), weights=grad.reshape(-1), minlength=300))


@pytest.mark.gpu
def test_gpu_backward_does_not_synchronise():
    weights = torch.randn(300, device="cuda", requires_grad=True)
    ids = torch.randint(0, 300, (8, 64, 64), device="cuda")
    grad = torch.randn(8, 64, 64, device="cuda")
    out = bucket_lookup(weights, ids)
    torch.cuda.set_sync_debug_mode("error")
    try:
        (got,) = torch.autograd.grad(out, weights, grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = torch.zeros(300, dtype=torch.float64, device="cuda").index_add_(0, ids.reshape(-1), grad.reshape(-1).double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
