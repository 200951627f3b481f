"""The fused UVQK activation (Triton) against the PyTorch reference in float64: the four
pieces and the gradients of the projection and the bias, from gradients given in any row
and head strides. Without a GPU the kernel runs in the Triton interpreter. Tolerances
(relative, whole tensor): fp32 1e-5, bf16 1e-2."""

from __future__ import annotations

import pytest
import torch

from tests.triton_support import triton_or_skip

DEVICE = triton_or_skip()

from megatron_gr.ops.uvqk_activation import uvqk_activation  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def relative(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(tokens, heads, split_sizes, dtype, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = heads * sum(split_sizes)
    x = (torch.randn(tokens, 1, width, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
    bias = (torch.randn(width, generator=g)).to(DEVICE, dtype).requires_grad_() if with_bias else None
    return x, bias


def strided_grads(outs, seed):
    """Random gradients; the second and fourth as strided views (every other head of a wider
    tensor, every other row), as a backward may hand them over."""
    g = torch.Generator().manual_seed(seed)
    grads = []
    for i, out in enumerate(outs):
        tokens, heads, d = out.shape
        if i % 2:
            wide = torch.randn(tokens * 2, heads * 2, d + 3, generator=g)
            grads.append(wide.to(DEVICE, out.dtype)[::2, ::2, 1 : d + 1])
        else:
            grads.append(torch.randn(out.shape, generator=g).to(DEVICE, out.dtype))
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "tokens, heads, split_sizes, with_bias",
    [(37, 2, (64, 64, 64, 64), True), (50, 3, (3, 3, 4, 4), True), (9, 1, (16, 16, 32, 32), False),
     (1, 2, (128, 128, 128, 128), True),
     # blocks starting inside a piece; many row blocks per backward program (its loop runs)
     (40, 1, (100, 100, 60, 60), True), (3000, 2, (8, 8, 8, 8), True)],
)
def test_matches_reference(tokens, heads, split_sizes, with_bias, dtype):
    x, bias = make_inputs(tokens, heads, split_sizes, dtype, with_bias)
    leaves = [t for t in (x, bias) if t is not None]
    outs = uvqk_activation(x, bias, heads=heads, split_sizes=split_sizes, kernel="triton")
    grads = strided_grads(outs, seed=5)
    got = torch.autograd.grad(outs, leaves, grads)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_bias = ref_leaves[1] if with_bias else None
    ref = uvqk_activation(ref_leaves[0], ref_bias, heads=heads, split_sizes=split_sizes, kernel="pytorch")
    want = torch.autograd.grad(ref, ref_leaves, [g.double() for g in grads])
    for name, a, b in zip(["u", "v", "q", "k"], outs, ref):
        assert a.shape == b.shape == (tokens, heads, split_sizes["uvqk".index(name)]), name
        assert a.dtype == dtype
        assert relative(a, b) < TOLERANCE[dtype], f"{name}: {relative(a, b):.2e}"
    for name, a, b in zip(["dx", "d_bias"], got, want):
        assert a.shape == b.shape and a.dtype == dtype, name
        assert relative(a, b) < TOLERANCE[dtype], f"{name}: {relative(a, b):.2e}"


def test_unused_pieces_get_no_gradient():
    """Only q is used: the other pieces' gradients are zeros (autograd materialises them)."""
    x, bias = make_inputs(20, 2, (8, 8, 16, 16), torch.float32, True)
    _, _, q, _ = uvqk_activation(x, bias, heads=2, split_sizes=(8, 8, 16, 16), kernel="triton")
    (q * q).sum().backward()
    ref_x = x.detach().double().requires_grad_()
    ref_b = bias.detach().double().requires_grad_()
    _, _, ref_q, _ = uvqk_activation(ref_x, ref_b, heads=2, split_sizes=(8, 8, 16, 16), kernel="pytorch")
    (ref_q * ref_q).sum().backward()
    assert relative(x.grad, ref_x.grad) < 1e-5 and relative(bias.grad, ref_b.grad) < 1e-5
    assert x.grad.view(20, 2, 48)[:, :, :16].abs().max() == 0  # u and v columns


def test_no_tokens():
    x, bias = make_inputs(0, 2, (8, 8, 8, 8), torch.float32, True)
    outs = uvqk_activation(x, bias, heads=2, split_sizes=(8, 8, 8, 8), kernel="triton")
    assert [tuple(o.shape) for o in outs] == [(0, 2, 8)] * 4
    sum(o.sum() for o in outs).backward()
    assert x.grad.shape == x.shape and bias.grad.shape == bias.shape and bias.grad.abs().max() == 0


def test_bad_inputs_one_line_errors():
    x = torch.zeros(4, 2 * 16)
    with pytest.raises(ValueError, match=r"x must be \[T, 32\]"):
        uvqk_activation(x[:, :30], None, heads=2, split_sizes=(4, 4, 4, 4))
    with pytest.raises(ValueError, match="bias must be"):
        uvqk_activation(x, torch.zeros(31), heads=2, split_sizes=(4, 4, 4, 4))
    with pytest.raises(ValueError, match="split_sizes"):
        uvqk_activation(x, None, heads=2, split_sizes=(8, 8, 0, 0))
    with pytest.raises(ValueError, match="split_sizes"):  # u and v (q and k) share one width
        uvqk_activation(x, None, heads=2, split_sizes=(2, 6, 4, 4))
    with pytest.raises(ValueError, match="dtype"):
        uvqk_activation(x, torch.zeros(32, dtype=torch.float64), heads=2, split_sizes=(4, 4, 4, 4))


def test_strided_inputs_and_expanded_gradients():
    """x with padded rows, a strided bias, and gradients broadcast over rows or along the
    last dim: each is read (or copied) correctly, and dx is written within its tensor."""
    g = torch.Generator().manual_seed(3)
    split = (8, 8, 16, 16)
    wide = torch.randn(30, 2 * 48 + 5, generator=g).to(DEVICE)
    x = wide[:, : 2 * 48].requires_grad_()
    bias_wide = torch.randn(2 * 2 * 48, generator=g).to(DEVICE)
    bias = bias_wide[::2].requires_grad_()
    outs = uvqk_activation(x, bias, heads=2, split_sizes=split, kernel="triton")
    grads = [torch.randn(1, 2, d, generator=g).to(DEVICE).expand(30, 2, d) for d in split[:2]]
    grads += [torch.randn(30, 2, 1, generator=g).to(DEVICE).expand(30, 2, d) for d in split[2:]]
    got = torch.autograd.grad(outs, [x, bias], grads)
    ref_x, ref_b = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    ref = uvqk_activation(ref_x, ref_b, heads=2, split_sizes=split, kernel="pytorch")
    want = torch.autograd.grad(ref, [ref_x, ref_b], [t.double() for t in grads])
    for a, b in zip([*outs, *got], [*ref, *want]):
        assert relative(a, b) < 1e-5
