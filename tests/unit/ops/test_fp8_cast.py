"""The FP8 cast: the reference against a rule written out here (saturate, then torch's own
round-to-nearest-even conversion), and the fused Triton kernel bit for bit against the
reference on random inputs, every value class (normal, subnormal, ties, beyond the range),
each scale layout, the padded transpose and the amax. Without a GPU the kernel runs in
Triton's interpreter on small shapes; tests marked ``gpu`` run it compiled at training
sizes."""

from __future__ import annotations

import pytest
import torch

from tests.triton_support import triton_or_skip

DEVICE = triton_or_skip()

from megatron_gr.ops.fp8_cast import fp8_cast  # noqa: E402
from megatron_gr.ops.pytorch.fp8_cast import fp8_scale_view  # noqa: E402

FORMATS = pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])


def every_value_class(dtype: torch.dtype, rows: int, cols: int, seed: int) -> torch.Tensor:
    """Random magnitudes from far below the smallest subnormal to twice the largest value,
    plus every exactly representable value and the midpoints between neighbours (ties)."""
    g = torch.Generator().manual_seed(seed)
    finfo = torch.finfo(dtype)
    exponents = torch.empty(rows * cols).uniform_(-30, 18, generator=g)
    signs = torch.where(torch.rand(rows * cols, generator=g) < 0.5, -1.0, 1.0)
    values = signs * torch.exp2(exponents)
    grid = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = grid[grid.isfinite()].sort().values
    special = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, torch.tensor([finfo.max * 1.01, -finfo.max * 3])])
    values[: special.numel()] = special[: rows * cols]
    return values[torch.randperm(rows * cols, generator=g)].view(rows, cols)


@FORMATS
def test_reference_saturates_and_rounds_like_torch(dtype):
    x = every_value_class(dtype, 40, 30, seed=1)
    scale = torch.tensor([0.75])
    data, _ = fp8_cast(x, scale, dtype=dtype)
    limit = torch.finfo(dtype).max
    expected = (x * 0.75).clamp(-limit, limit).to(dtype)
    assert torch.equal(data.view(torch.uint8), expected.view(torch.uint8))
    assert data.float().abs().max() == limit  # values beyond the range saturate, never become inf/NaN


@FORMATS
@pytest.mark.parametrize("scale_axis", [None, 0, 1], ids=["tensor", "rows", "columns"])
@pytest.mark.parametrize("transpose_input", [False, True], ids=["contiguous", "strided"])
def test_triton_matches_reference_bitwise(dtype, scale_axis, transpose_input):
    rows, cols = 70, 45  # tiles with ragged edges
    x = every_value_class(dtype, cols, rows, seed=2).t() if transpose_input else every_value_class(dtype, rows, cols, seed=2)
    x = x.to(DEVICE)
    g = torch.Generator().manual_seed(3)
    size = {None: 1, 0: rows, 1: cols}[scale_axis]
    # powers of two keep the ties of every_value_class ties (a few scales move them off the grid)
    scale = torch.exp2(torch.randint(-2, 3, (size,), generator=g).float()).to(DEVICE)
    results = {}
    for kernel in ("pytorch", "triton"):
        amax = torch.full((1,), 0.5, device=DEVICE)
        data, data_t = fp8_cast(x, scale, dtype=dtype, scale_axis=scale_axis, transposed=True, pad_to=16,
                                amax=amax, kernel=kernel)
        results[kernel] = (data, data_t, amax)
    (ref, ref_t, ref_amax), (out, out_t, out_amax) = results["pytorch"], results["triton"]
    assert out_t.shape == (cols, 80) and out_t.is_contiguous()
    scaled = x * fp8_scale_view(scale, scale_axis)
    assert_same_bits(out, ref, scaled)  # bits: -0 and +0 differ too
    assert_same_bits(out_t[:, :rows], ref_t[:, :rows], scaled.t())
    assert torch.equal(out_t[:, rows:].float(), torch.zeros(cols, 80 - rows, device=DEVICE))
    assert out_amax.item() == ref_amax.item() == x.abs().max().item()


def test_amax_sees_nan_and_inf_as_inf():
    for kernel in ("pytorch", "triton"):
        for poison in (float("nan"), float("-inf")):
            x = torch.randn(20, 33, device=DEVICE)
            x[7, 5] = poison
            amax = torch.zeros(1, device=DEVICE)
            fp8_cast(x, torch.ones(1, device=DEVICE), dtype=torch.float8_e4m3fn, amax=amax, kernel=kernel)
            assert amax.item() == float("inf"), (kernel, poison)


def test_empty_input():
    for kernel in ("pytorch", "triton"):
        x = torch.zeros(0, 32, device=DEVICE)
        data, data_t = fp8_cast(x, torch.ones(1, device=DEVICE), dtype=torch.float8_e4m3fn, transposed=True,
                                pad_to=16, kernel=kernel)
        assert data.shape == (0, 32) and data_t.shape == (32, 0)


def test_rejects_bad_arguments():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="scale must be"):
        fp8_cast(x, torch.ones(8), dtype=torch.float8_e4m3fn, scale_axis=0)
    with pytest.raises(ValueError, match="dtype="):
        fp8_cast(x, torch.ones(1), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="kernel="):
        fp8_cast(x, torch.ones(1), dtype=torch.float8_e4m3fn, kernel="cuda")


def assert_same_bits(out: torch.Tensor, ref: torch.Tensor, scaled: torch.Tensor) -> None:
    """Bitwise equality, and on failure the first differing inputs with both results."""
    out, ref, scaled = out.cpu(), ref.cpu(), scaled.cpu()  # indexing FP8 tensors: on the host
    differ = out.view(torch.uint8) != ref.view(torch.uint8)
    if differ.any():
        where = differ.nonzero()[:8].unbind(1)
        rows = zip(scaled[where].tolist(), ref[where].float().tolist(), out[where].float().tolist())
        shown = "; ".join(f"x*scale={v!r}: reference {r!r}, triton {t!r}" for v, r, t in rows)
        shown += f"; triton bytes {out[where].view(torch.uint8).tolist()}, reference {ref[where].view(torch.uint8).tolist()}"
        raise AssertionError(f"{int(differ.sum())} of {differ.numel()} values differ, e.g. {shown}")


@pytest.mark.gpu
@FORMATS
@pytest.mark.parametrize("shape", [(16384, 1024), (8195, 4096)])
def test_triton_matches_reference_at_training_sizes(dtype, shape):
    x = (torch.randn(shape, device="cuda") * 30).to(torch.bfloat16)
    scale = torch.tensor([3.0], device="cuda")
    ref, ref_t = fp8_cast(x, scale, dtype=dtype, transposed=True, pad_to=16)
    out, out_t = fp8_cast(x, scale, dtype=dtype, transposed=True, pad_to=16, kernel="triton")
    assert_same_bits(out, ref, x.float() * 3)
    assert_same_bits(out_t, ref_t, torch.nn.functional.pad(x.float().t() * 3, (0, out_t.shape[1] - x.shape[0])))

