"""tools/benchmarks/fp8_linear_bits.py: two dumps of the same code compare equal, and one
flipped bit anywhere (here a NaN's sign) is reported."""

from __future__ import annotations

import types

import torch

from tests.unit.tools.benchmark_tools import load_benchmark


def _tool() -> types.ModuleType:
    return load_benchmark("fp8_linear_bits")


def test_dumps_of_the_same_code_match_and_a_flipped_nan_sign_does_not(tmp_path):
    tool = _tool()
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    assert tool.main(["dump", str(first)]) == 0 and tool.main(["dump", str(second)]) == 0
    assert tool.main(["compare", str(first), str(second)]) == 0
    tensors = torch.load(second)
    key = next(k for k, v in tensors.items() if v is not None and v.dtype == torch.float32 and torch.isnan(v).any())
    raw = tensors[key].view(torch.int32)
    raw[torch.isnan(tensors[key])] ^= -2**31  # the sign bit of every NaN: equal as floats, not as bits
    torch.save(tensors, second)
    assert tool.main(["compare", str(first), str(second)]) == 1
