"""mHC recompute: bitwise-equal outputs and gradients (dropout on), less activation memory
held between forward and backward and a lower peak, for STU and transformer blocks, and
for blocks that are pipeline stages (their output freed after it is sent)."""

from __future__ import annotations

import pytest
import torch
from megatron.core import tensor_parallel

from megatron_gr.transformer.mhc_recompute import MHCRecomputeManager
from tests.unit.transformer.helpers import block_inputs, build, config, run, run_two_stages


@pytest.mark.parametrize("kind", ["stu", "transformer"])
@pytest.mark.parametrize("recompute_layers", [1, 3, None])
def test_recompute_gives_identical_gradients_and_holds_less(megatron_cpu, kind, recompute_layers):
    plain = build(kind, config(kind, recompute=False))
    recomputed = build(kind, config(kind, recompute_layers=recompute_layers))
    recomputed.load_state_dict(plain.state_dict())
    assert len(recomputed.recompute_groups()) == {1: 4, 3: 2, None: 2}[recompute_layers]  # None: sqrt(4*4/6) -> 2
    x, kwargs = block_inputs(kind)
    rng_states = (torch.get_rng_state(), tensor_parallel.get_cuda_rng_tracker().get_states())
    out_a, dx_a, grads_a, held_a, peak_a = run(plain, x, kwargs, rng_states)
    out_b, dx_b, grads_b, held_b, peak_b = run(recomputed, x, kwargs, rng_states)
    assert torch.equal(out_a, out_b) and torch.equal(dx_a, dx_b)
    for name, grad in grads_a.items():
        assert torch.equal(grad, grads_b[name]), name
    assert held_b < 0.85 * held_a, (held_a, held_b)
    # The peak falls when a recompute block is small next to the stage: blocks of 3 of 4
    # layers replay most of the stage at once and peak about where the plain run does.
    if recompute_layers != 3:
        assert peak_b < 0.97 * peak_a, (peak_a, peak_b)


@pytest.mark.parametrize("kind", ["stu", "transformer"])
@pytest.mark.parametrize("recompute_layers", [None, 2])  # per stage of 2 layers: None -> 2 blocks, 2 -> 1
def test_recompute_across_pipeline_stages_gives_identical_gradients(megatron_cpu, kind, recompute_layers):
    """The stage output is the output of its last recompute block: the replay must not
    need it (the schedule freed it) and the gradients stay those of the plain run."""
    stages = []
    for cfg in (config(kind, recompute=False, num_layers=2), config(kind, recompute_layers=recompute_layers, num_layers=2)):
        first, last = build(kind, cfg, post_process=False), build(kind, cfg, pre_process=False)
        if stages:
            first.load_state_dict(stages[0][0].state_dict())
            last.load_state_dict(stages[0][1].state_dict())
        stages.append((first, last))
    assert len(stages[1][0].recompute_groups()) == {None: 2, 2: 1}[recompute_layers]  # None: round(sqrt(4*2/6))
    x, kwargs = block_inputs(kind)
    rng_states = (torch.get_rng_state(), tensor_parallel.get_cuda_rng_tracker().get_states())
    sent_a, out_a, dx_a, grads_a = run_two_stages(*stages[0], x, kwargs, rng_states)
    sent_b, out_b, dx_b, grads_b = run_two_stages(*stages[1], x, kwargs, rng_states)
    assert sent_a.shape == (*x.shape[:2], 4 * x.shape[2]) and out_a.shape == x.shape
    assert torch.equal(sent_a, sent_b) and torch.equal(out_a, out_b) and torch.equal(dx_a, dx_b)
    for name, grad in grads_a.items():
        assert torch.equal(grad, grads_b[name]), name


def test_full_layer_recompute_gives_identical_gradients(megatron_cpu):
    plain = build("stu", config("stu", recompute=False))
    full = build("stu", config("stu", recompute=False, recompute_granularity="full", recompute_method="uniform",
                               recompute_num_layers=2))
    full.load_state_dict(plain.state_dict())
    x, kwargs = block_inputs("stu")
    rng_states = (torch.get_rng_state(), tensor_parallel.get_cuda_rng_tracker().get_states())
    out_a, dx_a, grads_a, _, _ = run(plain, x, kwargs, rng_states)
    out_b, dx_b, grads_b, _, _ = run(full, x, kwargs, rng_states)
    assert torch.equal(out_a, out_b) and torch.equal(dx_a, dx_b)
    assert all(torch.equal(g, grads_b[n]) for n, g in grads_a.items())


def test_no_recompute_without_grad_or_in_eval(megatron_cpu):
    block = build("transformer", config("transformer", recompute_layers=1))
    x, kwargs = block_inputs("transformer")
    with torch.no_grad():
        a = block(x, **kwargs)
    block.eval()
    torch.testing.assert_close(block(x, **kwargs), block(x, **kwargs))
    assert a.shape == x.shape


def test_manager_is_single_use(megatron_cpu):
    manager = MHCRecomputeManager()
    x = torch.randn(3, requires_grad=True)
    y = manager.checkpoint(torch.sin, x)
    manager.discard_outputs_and_register_recompute(y * 2)
    with pytest.raises(RuntimeError, match="already closed"):
        manager.checkpoint(torch.sin, x)
