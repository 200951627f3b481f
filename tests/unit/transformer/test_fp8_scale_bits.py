"""The scale arithmetic of the FP8 linears, rewritten with fewer ops (issue 14, host work),
gives the same bits as the formulas it replaced, on adversarial amaxes: zeros, subnormals,
values around ``MIN_AMAX``, the largest float32, inf and NaN (NaN payloads included)."""

import pytest
import torch

from megatron_gr.transformer.fp8.scaling import MIN_AMAX, AmaxHistory, scale_from_amax, scale_inv_of

FORMATS = [torch.float8_e4m3fn, torch.float8_e5m2]
TINY = torch.finfo(torch.float32).tiny
ADVERSARIAL = [
    0.0, -0.0, 1e-45, 1e-40, TINY, MIN_AMAX / 2, MIN_AMAX, MIN_AMAX * 1.0000001, 1e-7, 0.5, 1.0, 3.0, 448.0,
    57344.0, 1e20, 3.0e38, torch.finfo(torch.float32).max, float("inf"), float("nan"),
]


def old_scale_from_amax(amax, *, dtype, margin):
    return (torch.finfo(dtype).max / 2.0**margin) / amax.float().clamp(min=MIN_AMAX)


def old_scale_inv_of(scale, amax):
    return torch.where(torch.isfinite(amax), scale.reciprocal(), float("nan"))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def adversarial_amaxes(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spread = torch.exp2(torch.empty(64).uniform_(-149, 127.9, generator=g))  # every binade of float32
    return torch.cat([torch.tensor(ADVERSARIAL), spread])


@pytest.mark.parametrize("dtype", FORMATS, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("margin", [0, 1, 3, 200])  # 200: the scale underflows to 0
@pytest.mark.parametrize("shape", [(-1,), (-1, 1), (1, -1)])
def test_scale_and_its_inverse_match_the_old_formulas_bitwise(dtype, margin, shape):
    amax = adversarial_amaxes(margin).reshape(shape)
    scale = scale_from_amax(amax, dtype=dtype, margin=margin)
    old = old_scale_from_amax(amax, dtype=dtype, margin=margin)
    assert scale.shape == old.shape and torch.equal(bits(scale), bits(old))
    inverse, old_inverse = scale_inv_of(scale, amax), old_scale_inv_of(old, amax)
    assert inverse.shape == old_inverse.shape and torch.equal(bits(inverse), bits(old_inverse))
    assert torch.isnan(inverse[~torch.isfinite(amax)]).all()  # overflow shows as NaN


class OldAmaxHistory:
    """AmaxHistory.record as it was before the host-work rewrite."""

    def __init__(self, *, length, compute_algo, dtype, margin):
        self.length, self.compute_algo, self.dtype, self.margin = length, compute_algo, dtype, margin
        self.history = torch.zeros(length)
        self.scale = torch.ones(1)

    def record(self, amax):
        amax = amax.reshape(1).float()
        finite = torch.isfinite(amax)
        self.history = torch.where(finite, torch.cat([amax, self.history[:-1]]), self.history)
        reference = self.history.amax().reshape(1) if self.compute_algo == "max" else self.history[:1]
        updated = old_scale_from_amax(reference, dtype=self.dtype, margin=self.margin)
        self.scale = torch.where(finite & (reference > 0), updated, self.scale)


@pytest.mark.parametrize("length", [1, 3])
@pytest.mark.parametrize("algo", ["max", "most_recent"])
def test_amax_history_matches_the_old_record_bitwise(length, algo):
    kwargs = dict(length=length, compute_algo=algo, dtype=torch.float8_e5m2, margin=1)
    history, old = AmaxHistory(**kwargs), OldAmaxHistory(**kwargs)
    for step, amax in enumerate(adversarial_amaxes(length).tolist()[::-1]):
        history.record(torch.tensor([amax]))
        old.record(torch.tensor([amax]))
        assert torch.equal(bits(history.history), bits(old.history)), step
        assert torch.equal(bits(history.scale), bits(old.scale)), step


def test_amax_buffer_is_zeroed_for_each_cast():
    history = AmaxHistory(length=2, compute_algo="max", dtype=torch.float8_e4m3fn, margin=0)
    buffer = history.amax_buffer(torch.device("cpu"))
    buffer.fill_(7.0)
    again = history.amax_buffer(torch.device("cpu"))
    assert again is buffer and again.tolist() == [0.0]
