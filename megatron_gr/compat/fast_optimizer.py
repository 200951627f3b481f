"""megatron-core's optimizer step without a device read per parameter and with few launches.

Without apex or Transformer Engine, megatron-core 0.16.1 steps with fallbacks that cost a
bf16 training step milliseconds of host time:

- ``local_multi_tensor_l2_norm`` (the gradient norm) takes ``torch.norm`` of every gradient
  and builds a CPU tensor from them: one device-to-host read, a synchronisation, per
  parameter; ``local_multi_tensor_scale`` (clipping, the main-to-model weight copy of the
  non-distributed optimizer) launches two kernels per tensor;
- the distributed optimizer copies its fp32 main shards into the bf16 weights one
  ``copy_`` per parameter, and hands each main shard its gradient by looking up the
  parameter's range and slicing the gradient buffer anew in every step (three operator
  dispatches and a few dictionary lookups per parameter);
- torch's Adam runs its for-each implementation (about a dozen passes over weights and
  moments) instead of its fused kernel.

:func:`fast_optimizer_ops` replaces the two helpers by torch's for-each kernels (the norm
stays on the device until megatron reads it once; on one rank without megatron's all-reduce
and scratch tensor); :func:`use_fused_adam` switches torch
Adam to ``fused=True``; :func:`batch_main_to_model_copies` does the distributed
optimizer's copy as one for-each copy per dtype pair; :func:`reuse_main_grad_views` slices the gradient
buffer once and hands the main shards the same views in every step (and, those views being
the same tensors, lists the gradients of the norm once; it also drops the gradients in
``zero_grad`` without reading each first). Each leaves megatron alone where apex, TE, FSDP,
FP8 or precision-aware optimizers are in use.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, TypeVar

import torch

from megatron_gr.compat.optimizer_step import _parts
from megatron_gr.compat.patching import PatchSet
from megatron_gr.compat.single_rank import skip_alone
from megatron_gr.compat.version import require

T = TypeVar("T")

_PATCHES = PatchSet()
_depth = 0


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """``amp_C.multi_tensor_l2norm``'s contract: ``([1] float32 norm of every tensor of
    tensor_lists[0]], None)``, computed on the device without a host read."""
    del chunk_size, noop_flag, per_tensor, args
    tensors = tensor_lists[0]
    norms = torch._foreach_norm(tensors)
    # float32 gradients (the main gradients) give float32 norms: no conversion to dispatch
    norms = [n if n.dtype == torch.float32 else n.float() for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """``amp_C.multi_tensor_scale``'s contract: ``dst = src * scale`` for each pair of
    ``tensor_lists = [src, dst]`` (in place when they are the same tensors)."""
    del chunk_size, noop_flag
    sources, targets = tensor_lists
    if all(s is t for s, t in zip(sources, targets)):
        torch._foreach_mul_(targets, scale)
    elif scale == 1.0:
        torch._foreach_copy_(targets, sources)
    else:
        torch._foreach_copy_(targets, torch._foreach_mul(sources, scale))


def grad_norm_skipping_alone(original: Callable) -> Callable:
    """megatron's ``get_grad_norm_fp32`` for the L2 norm over a gradient-statistics group of
    one rank, with :func:`foreach_l2_norm` as its norm: megatron's own operations (the
    for-each norm, its square, the host read, the square root) without its scratch tensor,
    its per-gradient DTensor checks and its all-reduce over that one rank, which leaves
    the square as it is. Any other case is megatron's."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    def get_grad_norm_fp32(grads_for_norm, norm_type=2, grad_stats_parallel_group=None):
        if (
            float(norm_type) != 2.0 or isinstance(grads_for_norm, torch.Tensor) or not grads_for_norm
            or clip_grads.l2_norm_impl is not foreach_l2_norm
            or torch.distributed.get_world_size(grad_stats_parallel_group) != 1
            or (utils.HAVE_DTENSOR and any(isinstance(grad, utils.DTensor) for grad in grads_for_norm))
        ):
            return original(grads_for_norm, norm_type=norm_type, grad_stats_parallel_group=grad_stats_parallel_group)
        grad_norm, _ = foreach_l2_norm(None, None, [grads_for_norm], False)
        return (grad_norm**2.0).item() ** (1.0 / 2.0)

    return get_grad_norm_fp32


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """megatron's ``to_local_if_dtensor`` (a DTensor's local shard, any other tensor as it
    is) without entering ``torch.no_grad()`` for tensors that are not DTensors: megatron's
    gradient norm and clipping call it for every gradient of every step."""
    from megatron.core import utils

    if utils.HAVE_DTENSOR and isinstance(tensor, utils.DTensor):
        with torch.no_grad():
            return tensor.to_local()
    return tensor


@contextlib.contextmanager
def fast_optimizer_ops() -> Iterator[None]:
    """megatron's local multi-tensor norm and scale replaced by :func:`foreach_l2_norm` and
    :func:`foreach_scale` inside the block (nested blocks are free), its gradient norm's
    and clipping's DTensor unwrapping by :func:`local_tensor`, and its gradient and weight
    buffer collectives skipped on a data-parallel group of one rank
    (:func:`megatron_gr.compat.single_rank.skip_alone`); restored on exit. Where apex or TE
    provide the multi-tensor kernels, those are not patched."""
    global _depth
    if _depth == 0:
        try:
            _patch_local_multi_tensor_helpers(_PATCHES)
            _patch_dtensor_unwrap(_PATCHES)
            skip_alone(_PATCHES)
        except BaseException:
            _PATCHES.restore()
            raise
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            _PATCHES.restore()


def _patch_local_multi_tensor_helpers(patches: PatchSet) -> None:
    """Patches: ``clip_grads.l2_norm_impl`` and ``multi_tensor_scale_impl`` (the gradient
    norm and clipping) and ``optimizer.multi_tensor_scale_impl`` (the main-to-model copy of
    the non-distributed mixed-precision optimizer), when they are megatron's local
    fallbacks; with the norm, ``optimizer.get_grad_norm_fp32`` (:func:`grad_norm_skipping_alone`)."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    purpose = "compute the gradient norm and scale gradients with torch's for-each kernels"
    if getattr(clip_grads, "l2_norm_impl", None) is getattr(utils, "local_multi_tensor_l2_norm", ()):
        patches.set(clip_grads, "l2_norm_impl", foreach_l2_norm, purpose=purpose)
        patches.set(optimizer, "get_grad_norm_fp32", grad_norm_skipping_alone(optimizer.get_grad_norm_fp32),
                    purpose="take the gradient norm on one rank without megatron's all-reduce")
    for module in (clip_grads, optimizer):
        if getattr(module, "multi_tensor_scale_impl", None) is getattr(utils, "local_multi_tensor_scale", ()):
            patches.set(module, "multi_tensor_scale_impl", foreach_scale, purpose=purpose)


def _patch_dtensor_unwrap(patches: PatchSet) -> None:
    """Patches: ``clip_grads.to_local_if_dtensor`` (the gradient norm's and clipping's
    per-gradient unwrapping) with :func:`local_tensor`, the same tensors."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    if getattr(clip_grads, "to_local_if_dtensor", None) is getattr(utils, "to_local_if_dtensor", ()):
        patches.set(clip_grads, "to_local_if_dtensor", local_tensor, purpose="unwrap gradients without a no_grad block each")


def use_fused_adam(optimizer) -> int:
    """Switches every torch ``Adam``/``AdamW`` inside megatron's ``optimizer`` to its fused
    kernel (``fused=True``), moving existing ``step`` counters to the weights' device as
    fused Adam needs; returns how many torch optimizers were switched. Call it again after
    loading optimizer state (a loaded state dict brings its own ``fused`` setting)."""
    switched = 0
    for part in _parts(optimizer):
        inner = getattr(part, "optimizer", None)
        if type(inner) not in (torch.optim.Adam, torch.optim.AdamW) or not _fused_capable(inner):
            continue
        inner.defaults.update(fused=True, foreach=False)
        for group in inner.param_groups:
            group.update(fused=True, foreach=False)
            for param in group["params"]:
                state = inner.state.get(param, {})
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].to(device=param.device, dtype=torch.float32)
        switched += 1
    return switched


def _fused_capable(inner: torch.optim.Optimizer) -> bool:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    params = [p for group in inner.param_groups for p in group["params"]]
    return bool(params) and all(
        p.device.type in devices and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params
    ) and not any(group.get("differentiable", False) for group in inner.param_groups)


def batch_main_to_model_copies(optimizer) -> int:
    """Replaces the distributed optimizer's per-parameter main-to-model weight copy by one
    for-each copy per (weight, shard) dtype pair over the same views; returns how many optimizers were changed. Left to
    megatron with megatron FSDP, FP8 weights or a precision-aware optimizer."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    changed = 0
    for part in _parts(optimizer):
        if not isinstance(part, DistributedOptimizer) or not _plain_distributed_copy(part):
            continue
        require(part, "_copy_main_params_to_model_params", purpose="copy main weights to the model in one launch")
        def copy_main_params_to_model_params(views=_once(functools.partial(_main_to_model_views, part))):
            for targets, sources in views():
                torch._foreach_copy_(targets, sources)

        part._copy_main_params_to_model_params = copy_main_params_to_model_params
        changed += 1
    return changed


def reuse_main_grad_views(optimizer) -> int:
    """Replaces the distributed optimizer's per-step gradient hand-over (main shard ``.grad``
    = its slice of the gradient buffer, as float32) by views sliced once; returns how many
    optimizers were changed. The views are of DDP's gradient buffers, which live as long as
    the model and are zeroed in place, so every step's gradients are the same as megatron's
    (the same tensors when the buffer is float32; then the gradients of the norm, megatron's
    per-parameter filter of them, are listed once too). ``zero_grad`` sets the gradients to
    None as megatron's does, without reading them first. Left to megatron where
    :func:`batch_main_to_model_copies` is."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    changed = 0
    for part in _parts(optimizer):
        if not isinstance(part, DistributedOptimizer) or not _plain_distributed_copy(part):
            continue
        require(part, "_copy_model_grads_to_main_grads", purpose="hand the main shards their gradients without slicing")
        views = _once(functools.partial(_main_grad_views, part))

        def copy_model_grads_to_main_grads(views=views):
            for shard_main_param, view in views():
                shard_main_param.grad = view if view.dtype == torch.float32 else view.float()

        part._copy_model_grads_to_main_grads = copy_model_grads_to_main_grads
        require(part, "zero_grad", purpose="drop the gradients without reading them")
        part.zero_grad = functools.partial(_zero_grad, part, part.zero_grad)
        if part.ddp_config.grad_reduce_in_fp32:  # float32 buffers: every step hands over the same views
            require(part, "get_main_grads_for_grad_norm", purpose="list the gradients of the norm once")
            part.get_main_grads_for_grad_norm = _once(functools.partial(_grads_for_norm, part, views))
        changed += 1
    return changed


def _zero_grad(part, megatrons: Callable, set_to_none: bool = True) -> None:
    """megatron's ``zero_grad`` of the distributed optimizer: with ``set_to_none`` every
    model weight's and main shard's ``.grad`` set to None, as megatron's loop leaves them,
    without first reading each (on a view, each read raises a warning that the warnings
    filters then match); otherwise megatron's."""
    if not set_to_none:
        megatrons(set_to_none=False)
        return
    for groups in (part.model_float16_groups, part.model_fp32_groups, part.shard_float16_groups,
                   part.shard_fp32_groups, part.shard_fp32_from_float16_groups):
        for group in groups:
            for param in group:
                param.grad = None


def _grads_for_norm(part, views: Callable[[], list]) -> list[torch.Tensor]:
    """megatron's ``get_main_grads_for_grad_norm`` after the hand-over, in its order: the
    views of the main shards that are neither shared nor tensor-parallel duplicates. Both
    are properties of the parameters, and the views the same tensors in every step, so the
    list is built once instead of filtering every parameter (a process-group rank lookup
    each) in every step."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer.module import param_is_not_shared

    view_of = {id(shard_main_param): view for shard_main_param, view in views()}
    tp_group = getattr(part, "tp_group", None)
    return [
        view_of[id(param)] for param in part.get_parameters()
        if param_is_not_shared(param) and tensor_parallel.param_is_not_tensor_parallel_duplicate(param, tp_group)
    ]


def _once(build: Callable[[], T]) -> Callable[[], T]:
    """``build()``, computed on the first call and kept: one cache per optimizer part (a
    closure over a loop variable would share one between the parts)."""
    cache: list = []

    def get() -> T:
        if not cache:
            cache.append(build())
        return cache[0]

    return get


def _main_grad_views(part) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(main shard, its slice of the model gradient buffer), as megatron's loop pairs them."""
    pairs = []
    for model_groups, shard_groups in (
        (part.model_float16_groups, part.shard_fp32_from_float16_groups),
        (part.model_fp32_groups, part.shard_fp32_groups),
    ):
        for model_group, shard_group in zip(model_groups, shard_groups):
            for model_param, shard_main_param in zip(model_group, shard_group):
                param_range = part._get_model_param_range_map(model_param)["param"]
                if param_range.size != shard_main_param.nelement():
                    raise AssertionError("megatron's parameter range does not match its main shard")
                pairs.append((shard_main_param, model_param.main_grad.view(-1)[param_range.start : param_range.end]))
    return pairs


def _plain_distributed_copy(part) -> bool:
    if part.ddp_config.use_megatron_fsdp or part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        return False
    groups = part.model_float16_groups + part.model_fp32_groups
    return not any(type(p).__name__.startswith("Float8") for group in groups for p in group)


def _main_to_model_views(part) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """(model weight views in the parameter buffers, main shards), as megatron's loop pairs
    them, in one group per (weight dtype, shard dtype): a for-each copy whose lists mix
    dtypes falls back to one copy kernel per tensor (e.g. bf16 layers beside mHC's float32
    maps)."""
    groups: dict[tuple[torch.dtype, torch.dtype], tuple[list, list]] = {}
    for shard_groups, model_groups in (
        (part.shard_fp32_from_float16_groups, part.model_float16_groups),
        (part.shard_fp32_groups, part.model_fp32_groups),
    ):
        for shard_group, model_group in zip(shard_groups, model_groups):
            for shard_main_param, model_param in zip(shard_group, model_group):
                world_range = part._get_model_param_range_map(model_param)["gbuf_world_in_bucket"]
                gbuf_index, _, bucket_id = part.model_param_gbuf_map[model_param]
                buffer = part.buffers[gbuf_index].buckets[bucket_id].param_data
                targets, sources = groups.setdefault((buffer.dtype, shard_main_param.dtype), ([], []))
                targets.append(buffer.view(-1)[world_range.start : world_range.end])
                sources.append(shard_main_param)
    return list(groups.values())
