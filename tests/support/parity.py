"""Comparisons of a parallel (or otherwise reordered) fp32 computation with its reference
that hold on any CPU.

Two layouts of one fp32 computation differ only in the order of their floating-point sums,
and such differences scale with the size of the terms summed, not with the size of each
result entry: an entry that is a near-cancelling sum can differ by many ulps of itself,
and by other amounts on another CPU (SIMD width changes the order inside kernels). So a
tensor is compared against its largest entry, with a floor for tensors that are small
next to the quantity they are part of (e.g. a parameter's gradient next to the whole
model's gradient), never element by element at fp32's edge.
"""

from __future__ import annotations

import torch


def scale_bound(expected: torch.Tensor, *, rtol: float, floor: float = 0.0) -> float:
    """``rtol * max(max|expected|, floor)``: the allowed largest difference."""
    return rtol * max(float(expected.abs().max()) if expected.numel() else 0.0, floor)


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, floor: float = 0.0,
                          what: str) -> None:
    """``max|actual - expected| <= rtol * max(max|expected|, floor)``; shapes equal.

    A wrong reduction (a value doubled, halved, missing a rank's share) moves the largest
    entries by a sizeable fraction of themselves and fails whenever ``rtol`` is well below 1
    and the tensor's largest entry is above ``floor``.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = float((actual.double() - expected.double()).abs().max()) if expected.numel() else 0.0
    bound = scale_bound(expected, rtol=rtol, floor=floor)
    assert error <= bound, f"{what}: max difference {error:.2e} > {bound:.2e}"
