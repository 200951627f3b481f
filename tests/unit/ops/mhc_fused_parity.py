"""Inputs and the comparison of the fused mHC pairs: each fused op (Triton) and the
composition of the ops it replaces, run as the separate Triton kernels and as the float64
reference, on the same random inputs; forward outputs and every gradient."""

from __future__ import annotations

import torch

from megatron_gr.ops.keyed_dropout import DropoutKeys
from megatron_gr.ops.mhc import input_expand, mhc_merge, mhc_pre, output_contract


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def merge_inputs(tokens: int, n: int, channels: int, dtype: torch.dtype, device, *, seed: int, expanded: bool,
                 with_bias: bool = True) -> dict:
    """The merge's inputs: x ``[T, n, C]`` (or the block input ``[T, C]`` when ``expanded``),
    h_res (rows of a softmax), h_post in (0, 2), y, bias."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((tokens, channels) if expanded else (tokens, n, channels), generator=g)
    return dict(
        x=x.to(device, dtype).requires_grad_(),
        h_res=torch.softmax(torch.randn(tokens, n, n, generator=g), -1).to(device).requires_grad_(),
        h_post=(2 * torch.rand(tokens, n, generator=g)).to(device).requires_grad_(),
        y=torch.randn(tokens, channels, generator=g).to(device, dtype).requires_grad_(),
        bias=torch.randn(channels, generator=g).to(device, dtype).requires_grad_() if with_bias else None,
    )


def merge_keys(tokens: int, device) -> DropoutKeys:
    """Keys of a merge's dropout: large and negative token keys (both int64 halves reach
    the hash), a large seed, a feature offset (a tensor-parallel slice's)."""
    keys = torch.arange(tokens, dtype=torch.int64) * 2**33 - 3
    return DropoutKeys(seed=2**62 + 11, site=14, token_keys=keys.to(device), feature_offset=5)


def map_inputs(n: int, channels: int, device, *, seed: int, scale: float = 0.5) -> dict:
    """A pre op's maps: projection ``[n² + 2n, n C]``, gates, static logits (float32)."""
    g = torch.Generator().manual_seed(seed)
    width = n * n + 2 * n
    return dict(
        projection=(torch.randn(width, n * channels, generator=g) * scale).to(device).requires_grad_(),
        alpha=torch.tensor([0.7, 1.3, 0.9]).to(device).requires_grad_(),
        map_bias=torch.randn(width, generator=g).to(device).requires_grad_(),
    )


def separate_merge_pre(x, h_res, h_post, y, bias, projection, alpha, map_bias, *, kernel, iterations, eps,
                       dropout_p=0.0, training=False, dropout_keys=None):
    """The merge then the pre op, as the layers ran them before the fusion."""
    streams = input_expand(x, h_res.shape[1], kernel=kernel) if x.dim() == 2 else x
    merged = mhc_merge(streams, h_res, h_post, y, bias, dropout_p=dropout_p, training=training,
                       dropout_keys=dropout_keys, kernel=kernel)
    return (merged, *mhc_pre(merged, projection, alpha, map_bias, iterations=iterations, eps=eps, kernel=kernel))


def separate_expand_pre(x, projection, alpha, map_bias, *, num_streams, kernel, iterations, eps):
    return mhc_pre(input_expand(x, num_streams, kernel=kernel), projection, alpha, map_bias, iterations=iterations,
                   eps=eps, kernel=kernel)


def separate_merge_contract(x, h_res, h_post, y, bias, *, kernel, dropout_p=0.0, training=False,
                            dropout_keys=None):
    streams = input_expand(x, h_res.shape[1], kernel=kernel) if x.dim() == 2 else x
    merged = mhc_merge(streams, h_res, h_post, y, bias, dropout_p=dropout_p, training=training,
                       dropout_keys=dropout_keys, kernel=kernel)
    return output_contract(merged, kernel=kernel)


def _forward_backward(op, leaves, kwargs, grads, *, kernel, to=None):
    inputs = {name: (None if t is None else (t.detach().to(to).requires_grad_() if to else t))
              for name, t in leaves.items()}
    outs = op(**inputs, kernel=kernel, **kwargs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    live = [t for t in inputs.values() if t is not None]
    got = torch.autograd.grad(outs, live, [g.to(o.dtype) for g, o in zip(grads, outs)])
    return [*outs, *got]


def run_three_ways(fused, separate, leaves: dict, kwargs: dict, *, seed: int = 0) -> list[tuple]:
    """Every output and every gradient of the non-None leaves of the fused op (Triton), of
    the separate Triton ops (``separate`` with kernel='triton') and of the float64
    reference composition (``separate`` with kernel='pytorch' on float64 copies), from
    the same random output gradients: ``[(name, fused, separate, reference)]``."""
    outs = fused(**leaves, kernel="triton", **kwargs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed + 100)
    grads = [torch.randn(o.shape, generator=g).to(o.device) for o in outs]
    names = [f"out{i}" for i in range(len(outs))] + [f"d_{k}" for k, t in leaves.items() if t is not None]
    got = _forward_backward(fused, leaves, kwargs, grads, kernel="triton")
    before = _forward_backward(separate, leaves, kwargs, grads, kernel="triton")
    want = _forward_backward(separate, leaves, kwargs, [gr.double() for gr in grads], kernel="pytorch",
                             to=torch.float64)
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, f"{name}: {tuple(a.shape)} != {tuple(b.shape)}"
        assert a.dtype == b.dtype or b.dtype == torch.float64, name
        assert torch.isfinite(a).all(), name
    return list(zip(names, got, before, want))


def assert_as_accurate(results: list[tuple], *, floor: float, ratio: float = 1.5, floors: dict = None) -> None:
    """Each fused result is within ``ratio`` times the separate ops' relative error to the
    float64 reference, or within ``floor`` (per result name in ``floors``)."""
    for name, got, before, want in results:
        ours, theirs = relative(got, want), relative(before, want)
        bound = max(ratio * theirs, (floors or {}).get(name, floor))
        assert ours <= bound, f"{name}: fused {ours:.2e}, separate kernels {theirs:.2e} (bound {bound:.2e})"
