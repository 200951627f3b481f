"""megatron-core's optimizer step split where gradients it does not own join the norm.

``ChainedOptimizer.step`` (0.16.1) is: prepare the gradients (unscale, check for non-finite
values), take their norm, clip every part's main gradients by that one norm, step. Rows of
dynamic tables are trained beside the optimizer and must share the norm and the clip
factor, so the step is driven here in two halves, with megatron's own methods, in its
order; what a part of a chained optimizer is (``chained_optimizers``,
``is_stub_optimizer``, decoupled gradients) is its internal business, kept in this module.
The same two halves exist with the norm, the clip factor and the skip left on the device
(``prepare_grads_and_device_norm``, ``step_with_device_verdict``), for a step that never
waits for them (``training/step_verdict.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_gr.compat.version import require


def _parts(optimizer) -> list:
    """The optimizers a (possibly chained) megatron optimizer steps, without stubs (parts
    that hold no parameters on this rank)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [part for part in parts if not getattr(part, "is_stub_optimizer", False)]


def prepare_grads_and_norm(optimizer) -> tuple[bool, float]:
    """The first half of megatron's step: prepares the gradients; returns whether megatron
    found a non-finite gradient (it then skips the step: call nothing else) and their norm
    over every part (0.0 without any; computed either way, for the logs)."""
    for method in ("prepare_grads", "get_grad_norm"):
        require(optimizer, method, purpose="step dynamic tables with the dense optimizer")
    found_inf = bool(optimizer.prepare_grads())
    return found_inf, float(optimizer.get_grad_norm() or 0.0)


def clip_grads_and_step(optimizer, *, total_norm: float) -> bool:
    """The second half: clips every part's main gradients as ``ChainedOptimizer.step`` does,
    but by ``total_norm`` (which may count more than this optimizer's gradients), then
    steps. Returns whether the parameters were updated."""
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    from megatron_gr.compat.fast_optimizer import foreach_scale

    require(optimizer, "step_with_ready_grads", purpose="step dynamic tables with the dense optimizer")
    clip = optimizer.config.clip_grad
    # megatron's clipping scales only when this factor is below 1, but collects every
    # gradient (a detach per parameter) before it looks: most steps need none of it.
    if clip > 0.0 and clip / (total_norm + 1.0e-6) < 1.0:
        for part in _parts(optimizer):
            params = part.get_parameters()
            if not params:
                continue
            decoupled = getattr(part.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False)
            if decoupled or clip_grads.multi_tensor_scale_impl is not foreach_scale:
                clip_grad_by_total_norm_fp32(params, clip, total_norm, use_decoupled_grad=decoupled)
                continue
            # What megatron's clipping does with the for-each scale (fast_optimizer), without
            # its per-gradient checks (a detach and a type string each) and scratch tensor.
            _scale_main_grads([part], clip / (total_norm + 1.0e-6))
    return bool(optimizer.step_with_ready_grads())


def decides_on_device(optimizer) -> bool:
    """Whether :func:`step_with_device_verdict` can step ``optimizer``: every part is
    megatron's mixed-precision, fp32 or distributed optimizer around a fused torch Adam
    (whose kernel takes a skip flag as a tensor), without a loss scaler (its non-finite
    check reads the device) and without decoupled gradients."""
    parts = _parts(optimizer)
    if not parts:
        return False
    for part in parts:
        inner = getattr(part, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            return False
        if not all(group.get("fused") for group in inner.param_groups):
            return False
        if getattr(part, "grad_scaler", None) is not None:
            return False
        if getattr(part.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
            return False
        for method in ("prepare_grads", "get_main_grads_for_grad_norm", "get_grad_stats_parallel_group",
                       "step_with_ready_grads"):
            if not callable(getattr(part, method, None)):
                return False
    return True


def prepare_grads_and_device_norm(optimizer, device: torch.device) -> torch.Tensor:
    """:func:`prepare_grads_and_norm` for optimizers :func:`decides_on_device` accepts
    (without a loss scaler, megatron finds nothing non-finite here), with the norm left on
    the device: ``[1]`` float64 (the root of the float32 squares, as megatron takes it on
    the host, where Python's ``x ** 0.5`` may differ from this square root by an ulp), no
    host read. The squares are summed over the same groups, with the same collectives, as
    megatron's ``get_grad_norm`` (every rank issues them, a rank without gradients with a
    zero): the parts of a chained optimizer together when they share their group, else
    each part (stubs included) over its own."""
    import torch.distributed as dist

    if optimizer.prepare_grads():
        raise RuntimeError("megatron found non-finite gradients itself (a loss scaler): decide such steps on the host")
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is None:
        units = [([optimizer], optimizer.get_grad_stats_parallel_group())]
    elif len(chained) == 1 or optimizer.grads_states_parallel_group_is_shared():
        units = [(chained, chained[0].get_grad_stats_parallel_group())]
    else:
        units = [([part], part.get_grad_stats_parallel_group()) for part in chained]
    square = torch.zeros(1, dtype=torch.float32, device=device)
    for parts, group in units:
        grads = [grad for part in parts for grad in part.get_main_grads_for_grad_norm() if grad is not None]
        part_square = torch.zeros(1, dtype=torch.float32, device=device)
        if grads:
            norms = torch._foreach_norm(grads)
            part_square = torch.linalg.vector_norm(torch.stack([n.float() for n in norms])).square().reshape(1)
        if dist.get_world_size(group) > 1:  # megatron's all-reduce, on every rank of the group
            dist.all_reduce(part_square, group=group)
        square = square + part_square
    return square.double().sqrt()


def step_with_device_verdict(optimizer, *, skip: torch.Tensor, clip_coefficient: Optional[torch.Tensor]) -> None:
    """The second half of megatron's step with the verdict on the device: every part's main
    gradients times ``clip_coefficient`` (a 0-dim device tensor, ``min(1, clip / (norm +
    1e-6))`` as megatron computes it: a product by 1 where megatron would not scale, so the
    gradients are megatron's), then ``step_with_ready_grads`` with fused Adam
    told to move nothing where ``skip`` (0-dim float32, 0 or 1) is 1 (its step counts are
    put back too). The main-to-model copy that follows copies unchanged weights on a
    skipped step. Only for optimizers :func:`decides_on_device` accepts."""
    parts = _parts(optimizer)
    if clip_coefficient is not None:  # as a float32 factor: megatron's scale by a Python float
        _scale_main_grads(parts, clip_coefficient.float())
    inners = [part.optimizer for part in parts]
    for inner in inners:
        inner.found_inf = skip  # read by torch Adam's step
    try:
        optimizer.step_with_ready_grads()
    finally:
        for inner in inners:
            del inner.found_inf


def _scale_main_grads(parts: list, factor) -> None:
    """Every main gradient of ``parts`` times ``factor`` (a number or a 0-dim tensor), one
    for-each multiply: megatron's clipping with the for-each scale, without its per-gradient
    checks."""
    from megatron_gr.compat.fast_optimizer import local_tensor

    grads = [local_tensor(param.grad) for part in parts for param in part.get_parameters() if param.grad is not None]
    if grads:
        torch._foreach_mul_(grads, factor)
