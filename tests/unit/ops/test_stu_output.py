"""The fused STU output path (Triton) against the PyTorch reference: forward and every
gradient (float64 reference) without dropout and with it (the same keyed mask). Without a
GPU the kernel runs in the Triton interpreter. Tolerances (relative, whole tensor): fp32
1e-5, bf16 1e-2."""

from __future__ import annotations

import pytest
import torch

from tests.triton_support import triton_or_skip

DEVICE = triton_or_skip()

from megatron_gr.ops.keyed_dropout import DropoutKeys, keep_mask  # noqa: E402
from megatron_gr.ops.stu_output import stu_output  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def make_inputs(tokens, heads, dv, dtype, seed=0, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    attn = (torch.randn(tokens, heads, dv, generator=g) * 3 + 1).to(DEVICE, dtype).requires_grad_()
    # u as the STU layer has it: a per-head slice of the fused projection (strided).
    uvqk = torch.randn(tokens, heads, 3 * dv, generator=g).to(DEVICE, dtype)
    u = uvqk[..., dv : 2 * dv].detach().requires_grad_()
    weight = (1 + 0.3 * torch.randn(heads * dv, generator=g)).to(DEVICE, dtype).requires_grad_()
    bias = (0.2 * torch.randn(heads * dv, generator=g)).to(DEVICE, dtype).requires_grad_() if with_bias else None
    return attn, u, weight, bias


def relative(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens, heads, dv, with_bias", [(37, 2, 12, True), (5, 1, 64, False), (1, 3, 8, True)])
def test_matches_reference_without_dropout(tokens, heads, dv, with_bias, dtype):
    attn, u, weight, bias = make_inputs(tokens, heads, dv, dtype, with_bias=with_bias)
    leaves = [t for t in (attn, u, weight, bias) if t is not None]
    out = stu_output(attn, u, weight, bias, eps=1e-5, dropout_p=0.3, training=False, kernel="triton")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    got = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_bias = ref_leaves[3] if with_bias else None
    ref = stu_output(*ref_leaves[:3], ref_bias, eps=1e-5, dropout_p=0.3, training=False, kernel="pytorch")
    want = torch.autograd.grad(ref, ref_leaves, grad.double())
    assert out.shape == (tokens, heads * dv) and out.dtype == dtype
    for name, a, b in zip(["out", "d_attn", "d_u", "d_weight", "d_bias"], [out, *got], [ref, *want]):
        assert a.shape == b.shape, name
        assert relative(a, b) < TOLERANCE[dtype], f"{name}: {relative(a, b):.2e}"


def stu_keys(tokens: int, feature_offset: int = 0) -> DropoutKeys:
    keys = torch.arange(tokens, dtype=torch.int64) * 200 + 7
    return DropoutKeys(seed=2**40 + 3, site=9, token_keys=keys.to(DEVICE), feature_offset=feature_offset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens, heads, dv, feature_offset", [(37, 2, 12, 0), (300, 2, 16, 64), (5, 1, 64, 3)])
def test_dropout_draws_the_reference_mask(tokens, heads, dv, feature_offset, dtype):
    """p > 0: the kernel hashes the reference's keyed mask in the forward and again in the
    backward: output and every gradient match the float64 reference, the dropped elements
    are exactly the reference's, and the kept ones are scaled by 1 / (1 - p)."""
    p = 0.25
    attn, u, weight, bias = make_inputs(tokens, heads, dv, dtype, seed=1)
    keys = stu_keys(tokens, feature_offset)
    leaves = [attn, u, weight, bias]
    out = stu_output(attn, u, weight, bias, eps=1e-5, dropout_p=p, training=True, dropout_keys=keys, kernel="triton")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    got = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = stu_output(*ref_leaves, eps=1e-5, dropout_p=p, training=True, dropout_keys=keys, kernel="pytorch")
    want = torch.autograd.grad(ref, ref_leaves, grad.double())
    for name, a, b in zip(["out", "d_attn", "d_u", "d_weight", "d_bias"], [out, *got], [ref, *want]):
        assert relative(a, b) < TOLERANCE[dtype], f"{name}: {relative(a, b):.2e}"
    keep = keep_mask(keys, heads * dv, p=p)
    assert torch.equal(out != 0, keep), "the dropped elements are the keyed mask's"
    plain = stu_output(*ref_leaves, eps=1e-5, dropout_p=p, training=False, kernel="pytorch")
    torch.testing.assert_close(ref[keep], plain[keep] / (1 - p))


def test_dropout_in_training_needs_keys():
    attn, u, weight, bias = make_inputs(4, 1, 8, torch.float32)
    for kernel in ("pytorch", "triton"):
        with pytest.raises(ValueError, match="DropoutKeys"):
            stu_output(attn, u, weight, bias, eps=1e-5, dropout_p=0.1, training=True, kernel=kernel)
