"""The multi-rank comparisons (``layouts.py``) on the magnitudes the layouts produce: the
rounding differences seen between layouts pass with room for another CPU, and a wrong
reduction fails, in the large tensors and in the tiny near-cancelling mHC ones alike."""

from __future__ import annotations

import pytest
import torch

from tests.unit.parallel.layouts import assert_grads_close, assert_weights_close

GRAD_NORM = 66.0  # the first step's gradient norm


def gradients(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "decoder.layers.uvqk_proj.weight": 3.0 * torch.randn(4, 16, 32, generator=g),  # largest entries ~7
        "decoder.layers.hyper_connection.projection": 1e-6 * torch.randn(4, 15, 48, generator=g),  # ~3.7e-6
        "replica_max_diff": 0.0,
    }


def perturbed(values: dict, relative: float, seed: int = 1) -> dict:
    """Each tensor moved by ``relative`` x its largest entry, in random directions."""
    g = torch.Generator().manual_seed(seed)
    out = dict(values)
    for key, value in values.items():
        if key != "replica_max_diff":
            out[key] = value + relative * value.abs().max() * (2 * torch.rand(value.shape, generator=g) - 1)
    return out


def test_rounding_between_layouts_passes_with_room():
    expected = gradients()
    # 10x what one CPU showed (5e-6 of the tiny tensors, 3e-7 of the large ones)
    assert_grads_close(perturbed(expected, 5e-5), expected, GRAD_NORM, step=1)
    assert_grads_close(perturbed(expected, 3e-6), expected, GRAD_NORM, step=1)


@pytest.mark.parametrize("key", ["decoder.layers.uvqk_proj.weight", "decoder.layers.hyper_connection.projection"])
@pytest.mark.parametrize("factor", [2.0, 0.5, 0.0])
def test_a_wrong_reduction_fails(key, factor):
    """Doubled (summed twice), halved (one rank's share) or missing gradients."""
    expected = gradients()
    wrong = dict(expected, **{key: factor * expected[key]})
    with pytest.raises(AssertionError, match=key.replace(".", r"\.")):
        assert_grads_close(wrong, expected, GRAD_NORM, step=1)


def test_replicas_must_agree_exactly():
    expected = gradients()
    with pytest.raises(AssertionError, match="copies"):
        assert_grads_close({**expected, "replica_max_diff": 1e-12}, expected, GRAD_NORM, step=1)


def test_weights_catch_a_wrong_update_but_not_rounding():
    g = torch.Generator().manual_seed(2)
    weights = {"norm.weight": 1.0 + 0.01 * torch.randn(16, generator=g), "proj.weight": 0.02 * torch.randn(16, 16, generator=g),
               "replica_max_diff": 0.0}
    rounded = {k: (v + 2.4e-7 * torch.sign(v)) if k != "replica_max_diff" else v for k, v in weights.items()}  # 2 ulps of 1.0
    assert_weights_close(rounded, weights)
    for key in ("norm.weight", "proj.weight"):  # one Adam step of lr 3e-3 too many on one entry
        wrong = dict(weights, **{key: weights[key].clone()})
        wrong[key].view(-1)[0] += 3e-3
        with pytest.raises(AssertionError, match=key.replace(".", r"\.")):
            assert_weights_close(wrong, weights)
