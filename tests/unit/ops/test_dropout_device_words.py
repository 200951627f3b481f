"""Keyed dropout with its stream words read from a device tensor (``DropoutKeys.words``, what
CUDA graphs replay): the PyTorch reference and the Triton kernels (standalone dropout, fused
STU output, fused mHC merge) give exactly the mask and values of the words computed from the
host seed, forward and backward; the words, not the seed, decide (keys carrying seed A and
the words of seed B draw seed B's mask). Without a GPU the kernels run in the interpreter."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.triton_support import triton_or_skip

DEVICE = triton_or_skip()

from megatron_gr.ops.keyed_dropout import DropoutKeys, keyed_dropout  # noqa: E402
from megatron_gr.ops.mhc import mhc_merge  # noqa: E402
from megatron_gr.ops.pytorch.keyed_dropout import stream_words  # noqa: E402
from megatron_gr.ops.stu_output import stu_output  # noqa: E402
from megatron_gr.transformer.dropout_sites import dropout_word_table  # noqa: E402

SEED, OTHER_SEED, SITE = 2**62 + 17, 99, 13


def host_keys(tokens: int, seed: int = SEED, feature_offset: int = 3) -> DropoutKeys:
    """Negative and large keys: both int64 halves reach the hash."""
    keys = (torch.arange(tokens, dtype=torch.int64) - 4) * 2**33 + 5
    return DropoutKeys(seed=seed, site=SITE, token_keys=keys.to(DEVICE), feature_offset=feature_offset)


def device_keys(tokens: int, words_seed: int) -> DropoutKeys:
    """Keys whose seed says SEED while their words are ``words_seed``'s."""
    words = torch.tensor(stream_words(words_seed, SITE), dtype=torch.int64, device=DEVICE)
    return dataclasses.replace(host_keys(tokens), words=words)


def outputs_and_grads(op, leaves: list[torch.Tensor], keys: DropoutKeys) -> list[torch.Tensor]:
    out = op(*leaves, keys)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE, out.dtype)
    return [out, *torch.autograd.grad(out, leaves, grad)]


def dropout_op(kernel: str):
    return lambda x, keys: keyed_dropout(x, keys, p=0.3, training=True, kernel=kernel)


def stu_output_op(kernel: str):
    return lambda attn, u, weight, bias, keys: stu_output(
        attn, u, weight, bias, eps=1e-5, dropout_p=0.3, training=True, dropout_keys=keys, kernel=kernel
    )


def merge_op(kernel: str):
    return lambda x, h_res, h_post, y, bias, keys: mhc_merge(
        x, h_res, h_post, y, bias, dropout_p=0.3, training=True, dropout_keys=keys, kernel=kernel
    )


def leaves_for(name: str, tokens: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shapes = {
        "dropout": [(tokens, 2, 24)],
        "stu_output": [(tokens, 2, 16), (tokens, 2, 16), (32,), (32,)],
        "merge": [(tokens, 4, 20), (tokens, 4, 4), (tokens, 4), (tokens, 20), (20,)],
    }[name]
    return [torch.randn(shape, generator=g).to(DEVICE).requires_grad_() for shape in shapes]


OPS = {"dropout": dropout_op, "stu_output": stu_output_op, "merge": merge_op}


def check_device_words(name: str, kernel: str, tokens: int) -> None:
    op, leaves = OPS[name](kernel), leaves_for(name, tokens)
    want_same = outputs_and_grads(op, leaves, host_keys(tokens))
    got_same = outputs_and_grads(op, leaves, device_keys(tokens, SEED))
    want_other = outputs_and_grads(op, leaves, host_keys(tokens, seed=OTHER_SEED))
    got_other = outputs_and_grads(op, leaves, device_keys(tokens, OTHER_SEED))
    for got, want in ((got_same, want_same), (got_other, want_other)):
        for index, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"{name}/{kernel}: result {index} differs from the host words'"
    assert not torch.equal(want_same[0], want_other[0]), "two seeds, one mask: the test would prove nothing"


@pytest.mark.parametrize("kernel", ["pytorch", "triton"])
@pytest.mark.parametrize("name", list(OPS))
def test_device_words_draw_the_host_seeds_mask(name, kernel):
    check_device_words(name, kernel, tokens=37)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(OPS))
def test_gpu_device_words_at_training_size(name):
    check_device_words(name, "triton", tokens=8195)


def test_the_word_table_rows_are_the_sites_words():
    table = dropout_word_table(SEED, 9)
    assert table.dtype == torch.int64 and table.shape == (9, 3)
    assert [tuple(row) for row in table.tolist()] == [stream_words(SEED, site) for site in range(9)]


@pytest.mark.parametrize("words", [torch.zeros(4, dtype=torch.int64), torch.zeros(3, dtype=torch.int32)])
def test_malformed_words_are_refused(words):
    keys = dataclasses.replace(host_keys(5), words=words.to(DEVICE))
    with pytest.raises(ValueError, match=r"DropoutKeys.words must be a \[3\] int64 tensor"):
        keyed_dropout(torch.ones(5, 8, device=DEVICE), keys, p=0.1, training=True, kernel="pytorch")
