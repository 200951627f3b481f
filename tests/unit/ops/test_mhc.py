"""mHC ops against references written one token and one formula at a time: Sinkhorn-Knopp
in the direct (exp, then divide) form, the mappings of the paper's equations, aggregate and
merge as loops over streams."""

from __future__ import annotations

import pytest
import torch

from megatron_gr.ops.keyed_dropout import DropoutKeys, keep_mask
from megatron_gr.ops.mhc import (
    input_expand,
    mhc_aggregate,
    mhc_mappings,
    mhc_merge,
    mhc_pre,
    output_contract,
    sinkhorn,
)
from tests.unit.ops.mhc_reference import direct_sinkhorn, reference_mappings


def identity_leaning(n: int) -> torch.Tensor:
    """Logits of the module's initial H_res (0.8 on the diagonal)."""
    off = -torch.log(torch.tensor(4.0 * (n - 1), dtype=torch.float64))
    return (1 - torch.eye(n, dtype=torch.float64)) * off


def max_row_col_error(h: torch.Tensor) -> tuple[float, float]:
    return float((h.sum(-1) - 1).abs().max()), float((h.sum(-2) - 1).abs().max())


@pytest.mark.parametrize("std, iterations", [(0.01, 20), (0.1, 20), (0.3, 20), (1.0, 100)])
def test_sinkhorn_is_doubly_stochastic(std, iterations):
    g = torch.Generator().manual_seed(0)
    h = sinkhorn(torch.randn(1000, 4, 4, generator=g) * std, iterations)
    assert h.dtype == torch.float32 and (h >= 0).all()
    rows, cols = max_row_col_error(h)
    assert rows < 1e-5 and cols < 1e-5, (rows, cols)


def test_sinkhorn_from_the_initial_bias_is_doubly_stochastic():
    g = torch.Generator().manual_seed(1)
    logits = identity_leaning(4).float() + 0.05 * torch.randn(4000, 4, 4, generator=g)
    rows, cols = max_row_col_error(sinkhorn(logits, 20))
    assert rows < 1e-5 and cols < 1e-5, (rows, cols)


def test_sinkhorn_extreme_logits_stay_finite_and_exact_where_reachable():
    g = torch.Generator().manual_seed(2)
    core = 0.1 * torch.randn(2000, 4, 4, generator=g)
    # Row and column offsets of 1e4: exp() overflows in the direct form; they cancel in
    # the limit, which 20 iterations reach.
    offsets = 1e4 * torch.randn(2000, 4, 1, generator=g) + 1e4 * torch.randn(2000, 1, 4, generator=g)
    h = sinkhorn(core + offsets, 20)
    assert torch.isfinite(direct_sinkhorn(core + offsets, 20)).logical_not().any()  # the direct form fails
    rows, cols = max_row_col_error(h)
    assert rows < 1e-5 and cols < 1e-5, (rows, cols)
    # float32 holds logits near 4e4 to about 4e-3, which bounds the agreement with float64.
    torch.testing.assert_close(h.double(), sinkhorn((core + offsets).double(), 20), atol=4e-3, rtol=0)
    # Independent entries of std 3 or 1e3: Sinkhorn-Knopp itself converges too slowly for
    # 20 iterations to balance the rows (rows stay off by up to 3e-4 at std 3, by whole
    # units at 1e3); the result is still finite, in [0, 1], and its columns sum to 1.
    for std in (3.0, 1e3):
        logits = (std * torch.randn(2000, 4, 4, generator=g)).requires_grad_()
        wild = sinkhorn(logits, 20)
        assert torch.isfinite(wild).all() and (wild >= 0).all() and (wild <= 1).all()
        assert max_row_col_error(wild)[1] < 1e-5
        wild.backward(torch.randn(2000, 4, 4, generator=g))
        assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("std", [0.1, 2.0])
def test_sinkhorn_forward_and_backward_match_the_unrolled_direct_form(std):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(64, 4, 4, generator=g, dtype=torch.float64) * std).requires_grad_()
    weights = torch.randn(64, 4, 4, generator=g, dtype=torch.float64)
    ours = sinkhorn(logits, 20)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    ref = direct_sinkhorn(logits, 20)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), logits)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-10, atol=1e-12)


def test_sinkhorn_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 3, 3, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: sinkhorn(z, 7), (logits,))


def test_sinkhorn_backward_saves_only_its_input():
    saved = []
    logits = torch.randn(16, 4, 4, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sinkhorn(logits, 20)
    assert len(saved) == 1 and saved[0].shape == (16, 4, 4)


def random_mapping_inputs(num_tokens, n, channels, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, n, channels, generator=g).to(dtype)
    projection = torch.randn(n * n + 2 * n, n * channels, generator=g) * 0.5
    alpha = torch.tensor([0.7, 1.3, 0.9])
    bias = torch.randn(n * n + 2 * n, generator=g)
    return x, projection, alpha, bias


@pytest.mark.parametrize("n, channels", [(2, 3), (4, 8)])
def test_mappings_match_the_equations(n, channels):
    x, projection, alpha, bias = random_mapping_inputs(7, n, channels, seed=5)
    h_pre, h_post, h_res = mhc_mappings(x, projection, alpha, bias, iterations=20, eps=1e-6)
    assert h_pre.shape == (7, n) and h_post.shape == (7, n) and h_res.shape == (7, n, n)
    assert h_pre.dtype == h_post.dtype == h_res.dtype == torch.float32
    ref = reference_mappings(x, projection, alpha, bias, 20, 1e-6)
    for ours, expected in zip((h_pre, h_post, h_res), ref):
        torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)


def test_mappings_run_in_float32_for_bf16_streams():
    x, projection, alpha, bias = random_mapping_inputs(9, 4, 8, seed=6)
    ours = mhc_mappings(x.bfloat16(), projection, alpha, bias, iterations=20, eps=1e-6)
    ref = reference_mappings(x.bfloat16().float(), projection, alpha, bias, 20, 1e-6)
    for a, b in zip(ours, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_mappings_gradcheck_float64():
    x, projection, alpha, bias = (t.double().requires_grad_() for t in random_mapping_inputs(3, 2, 3, seed=7))

    def f(*args):
        return mhc_mappings(*args, iterations=5, eps=1e-6)

    assert torch.autograd.gradcheck(f, (x, projection, alpha, bias))


def test_pre_is_the_mappings_then_the_aggregate():
    x, projection, alpha, bias = random_mapping_inputs(7, 3, 5, seed=11)
    u, h_post, h_res = mhc_pre(x.bfloat16(), projection, alpha, bias, iterations=20, eps=1e-6)
    h_pre, *maps = mhc_mappings(x.bfloat16(), projection, alpha, bias, iterations=20, eps=1e-6)
    assert u.dtype == torch.bfloat16 and torch.equal(u, mhc_aggregate(x.bfloat16(), h_pre))
    assert torch.equal(h_post, maps[0]) and torch.equal(h_res, maps[1])


def test_aggregate_and_merge_match_loops():
    g = torch.Generator().manual_seed(8)
    num_tokens, n, channels = 5, 3, 4
    x = torch.randn(num_tokens, n, channels, generator=g, dtype=torch.float64)
    h_pre = torch.rand(num_tokens, n, generator=g, dtype=torch.float64)
    h_post = 2 * torch.rand(num_tokens, n, generator=g, dtype=torch.float64)
    h_res = direct_sinkhorn(torch.randn(num_tokens, n, n, generator=g, dtype=torch.float64), 20)
    y = torch.randn(num_tokens, channels, generator=g, dtype=torch.float64)
    b = torch.randn(channels, generator=g, dtype=torch.float64)
    agg = mhc_aggregate(x, h_pre)
    merged = mhc_merge(x, h_res, h_post, y, b)
    for t in range(num_tokens):
        torch.testing.assert_close(agg[t], sum(h_pre[t, i] * x[t, i] for i in range(n)))
        for i in range(n):
            expected = sum(h_res[t, i, j] * x[t, j] for j in range(n)) + h_post[t, i] * (y[t] + b)
            torch.testing.assert_close(merged[t, i], expected)


def test_merge_dropout_shares_one_mask_across_streams():
    g = torch.Generator().manual_seed(9)
    x = torch.zeros(6, 4, 16)
    h_res = torch.eye(4).expand(6, 4, 4)
    h_post = torch.ones(6, 4)
    y = torch.randn(6, 16, generator=g)
    keys = DropoutKeys(seed=3, site=6, token_keys=torch.arange(6) * 40 + 7)
    out = mhc_merge(x, h_res, h_post, y, None, dropout_p=0.5, training=True, dropout_keys=keys)
    dropped = out == 0
    assert dropped.any() and not dropped.all()
    assert (dropped == dropped[:, :1]).all()  # same positions in every stream
    assert torch.equal(~dropped[:, 0], keep_mask(keys, 16, p=0.5))  # the keyed mask of the token keys
    torch.testing.assert_close(out[:, 0][~dropped[:, 0]], 2 * y[~dropped[:, 0]])
    with pytest.raises(ValueError, match="DropoutKeys"):
        mhc_merge(x, h_res, h_post, y, None, dropout_p=0.5, training=True)
    assert torch.equal(mhc_merge(x, h_res, h_post, y, None, dropout_p=0.5, training=False), y.unsqueeze(1).expand(6, 4, 16))


def test_aggregate_and_merge_keep_the_stream_dtype():
    x = torch.randn(3, 2, 4).bfloat16()
    h = torch.rand(3, 2)
    assert mhc_aggregate(x, h).dtype == torch.bfloat16
    merged = mhc_merge(x, torch.eye(2).expand(3, 2, 2), h, torch.randn(3, 4).bfloat16(), None)
    assert merged.dtype == torch.bfloat16


def test_expand_then_contract_is_identity():
    x = torch.randn(5, 8, requires_grad=True)
    streams = input_expand(x, 4)
    assert streams.shape == (5, 4, 8) and streams.is_contiguous()
    assert torch.equal(streams[:, 2], x)
    torch.testing.assert_close(output_contract(streams), x)
    output_contract(streams).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda a: mhc_mappings(a["x"], a["projection"].bfloat16(), a["alpha"], a["bias"], iterations=20, eps=1e-6),
         ValueError, ["projection is torch.bfloat16", "float32"]),
        (lambda a: mhc_mappings(a["x"], a["projection"][:, :-1], a["alpha"], a["bias"], iterations=20, eps=1e-6),
         ValueError, ["projection must be [24, 32]"]),
        (lambda a: mhc_mappings(a["x"], a["projection"], a["alpha"], a["bias"], iterations=0, eps=1e-6),
         ValueError, ["iterations=0"]),
        (lambda a: mhc_mappings(a["x"][0], a["projection"], a["alpha"], a["bias"], iterations=20, eps=1e-6),
         ValueError, ["x must be a float [T, n, C]"]),
        (lambda a: mhc_pre(a["x"], a["projection"], a["alpha"].half(), a["bias"], iterations=20, eps=1e-6),
         ValueError, ["alpha is torch.float16"]),
        (lambda a: mhc_pre(a["x"], a["projection"], a["alpha"], a["bias"], iterations=20, eps=0.0),
         ValueError, ["eps=0.0"]),
        (lambda a: sinkhorn(torch.zeros(2, 3, 4), 5), ValueError, ["[T, n, n]"]),
        (lambda a: sinkhorn(torch.zeros(2, 3, 3), True), ValueError, ["iterations=True"]),
        (lambda a: mhc_aggregate(a["x"], torch.zeros(3, 4)), ValueError, ["h_pre must be [5, 4]"]),
        (lambda a: mhc_merge(a["x"], torch.zeros(5, 4, 4), torch.zeros(5, 4), torch.zeros(5, 7)), ValueError, ["y must be [5, 8]"]),
        (lambda a: mhc_merge(a["x"], torch.zeros(5, 4, 4), torch.zeros(5, 4), torch.zeros(5, 8), dropout_p=1.0),
         ValueError, ["dropout_p=1.0"]),
        (lambda a: input_expand(a["x"], 4), ValueError, ["x must be [T, C]"]),
        (lambda a: output_contract(a["x"], kernel="cuda"), ValueError, ["kernel='cuda'"]),
    ],
)
def test_bad_inputs_are_clear_errors(call, error, words):
    x, projection, alpha, bias = random_mapping_inputs(5, 4, 8, seed=10)
    with pytest.raises(error) as caught:
        call({"x": x, "projection": projection, "alpha": alpha, "bias": bias})
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


@pytest.mark.parametrize(
    "call",
    [
        lambda a: mhc_mappings(a["x"], a["projection"], a["alpha"], a["bias"], iterations=2, eps=1e-6,
                               kernel="triton"),
        lambda a: mhc_pre(a["x"], a["projection"], a["alpha"], a["bias"], iterations=2, eps=1e-6, kernel="triton"),
        lambda a: sinkhorn(torch.zeros(2, 3, 3), 5, kernel="triton"),
        lambda a: mhc_aggregate(a["x"], torch.zeros(5, 4), kernel="triton"),
        lambda a: mhc_merge(a["x"], torch.zeros(5, 4, 4), torch.zeros(5, 4), torch.zeros(5, 8), kernel="triton"),
    ],
)
def test_fused_kernels_refused_where_they_cannot_run(monkeypatch, call):
    """No silent fallback: without triton, or on CPU outside the interpreter, asking for the
    fused kernels is an error that names the setting to change."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, projection, alpha, bias = random_mapping_inputs(5, 4, 8, seed=10)
    with pytest.raises(RuntimeError, match=r"needs the triton package|CUDA devices only") as caught:
        call({"x": x, "projection": projection, "alpha": alpha, "bias": bias})
    assert "kernel='triton'" in str(caught.value) and "--kernel-backend pytorch" in str(caught.value)
