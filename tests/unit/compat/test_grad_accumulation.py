"""compat.grad_accumulation: the collecting hook adds each gradient to its main gradient once,
at the end of the backward pass, refuses a second accumulation in one pass, and a short
training run with it equals megatron's own hooks bit for bit (CPU, fp32)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from megatron_gr.compat.grad_accumulation import _collecting_hook
from tests.unit.training.helpers import tiny_config


def _hooked_parameter(values):
    param = torch.nn.Parameter(torch.tensor(values))
    param.main_grad = torch.full_like(param, 0.5)
    param.grad_added_to_main_grad = False
    wrapper = SimpleNamespace(param_to_bucket_group={param: 0})
    hook = _collecting_hook(wrapper, param, lambda: False)
    accumulator = param.expand_as(param).grad_fn.next_functions[0][0]
    accumulator.register_hook(hook)
    return param, hook, accumulator


def test_gradients_are_added_at_the_end_of_the_pass():
    param, _, _accumulator = _hooked_parameter([1.0, 2.0, 3.0])
    seen = []
    out = (param * torch.tensor([2.0, 3.0, 4.0])).sum()
    out.register_hook(lambda grad: seen.append(param.main_grad.clone()))  # before the accumulator
    out.backward()
    assert torch.equal(seen[0], torch.full((3,), 0.5))
    assert torch.equal(param.main_grad, torch.tensor([2.5, 3.5, 4.5])) and param.grad is None


def test_a_second_accumulation_in_one_pass_is_refused():
    param, hook, _accumulator = _hooked_parameter([1.0])

    def twice(grad):
        param.grad = torch.ones(1)
        hook()
        hook()

    out = param * 2.0
    out.register_hook(twice)
    with pytest.raises(RuntimeError, match="accumulated twice"):
        out.sum().backward()


def test_training_equals_megatrons_hooks(tmp_path, monkeypatch):
    from megatron_gr.training import model_setup
    from megatron_gr.training.runtime import shutdown
    from megatron_gr.training.trainer import Trainer

    def run(name):
        trainer = Trainer(tiny_config(tmp_path / name))
        records = [trainer.train_step() for _ in range(3)]
        weights = {k: v.clone() for k, v in trainer.model[0].state_dict().items() if isinstance(v, torch.Tensor)}
        collected = "_pending_main_grads" in vars(trainer.model[0])
        trainer.loader.close()
        shutdown()
        return [(r["loss"], r["grad_norm"]) for r in records], weights, collected

    batched = run("batched")
    monkeypatch.setattr(model_setup, "batched_main_grad_accumulation", contextlib.nullcontext)
    megatrons = run("megatron")
    assert batched[2] and not megatrons[2]
    assert batched[0] == megatrons[0]
    assert batched[1].keys() == megatrons[1].keys()
    assert all(torch.equal(batched[1][k], megatrons[1][k]) for k in batched[1])
