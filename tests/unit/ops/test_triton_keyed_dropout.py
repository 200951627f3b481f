"""The standalone keyed-dropout kernel (Triton) draws the reference's mask: the same dropped
elements, the same kept values and gradients, for any shape, dtype, feature offset and key
(negative keys of sequence-parallel padding, keys above 2^32). The fused kernels' dropout
(STU output, mHC merge) is checked in test_stu_output.py and test_triton_mhc.py. Without a
GPU the kernel runs in the Triton interpreter; the ``gpu`` test runs it at training size."""

from __future__ import annotations

import pytest
import torch

from tests.triton_support import triton_or_skip

DEVICE = triton_or_skip()

from megatron_gr.ops.keyed_dropout import DropoutKeys, keep_mask, keyed_dropout  # noqa: E402


def check_against_reference(shape, dtype, *, p=0.2, feature_offset=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = shape[0]
    key_values = torch.randint(-2**40, 2**40, (tokens,), generator=g)
    keys = DropoutKeys(seed=2**63 - 5 - seed, site=41, token_keys=key_values.to(DEVICE), feature_offset=feature_offset)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_()
    out = keyed_dropout(x, keys, p=p, training=True, kernel="triton")
    ref = keyed_dropout(x, keys, p=p, training=True, kernel="pytorch")
    features = x[0].numel() if tokens else 1
    keep = keep_mask(keys, features, p=p).view(shape) if tokens else torch.zeros(shape, dtype=torch.bool)
    assert out.shape == shape and out.dtype == dtype
    assert torch.equal((out != 0).cpu(), keep.cpu() & (x != 0).cpu())
    # the GPU's float32 division may round the last bit differently from torch's
    tolerance = dict(rtol=1e-6, atol=0.0) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.float(), ref.float(), **tolerance)
    grad = torch.randn(shape, generator=g).to(DEVICE, dtype)
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(got.float(), want.float(), **tolerance)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape, feature_offset", [((37, 16), 0), ((9, 3, 40), 96), ((1, 1100), 5), ((0, 8), 0)])
def test_kernel_draws_the_reference_mask(shape, feature_offset, dtype):
    check_against_reference(shape, dtype, feature_offset=feature_offset)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_kernel_at_training_size(dtype):
    check_against_reference((8195, 1024), dtype, p=0.1, feature_offset=1024, seed=3)
