"""``CudaToCpuMode``: a torch function mode that turns megatron-core's CUDA device requests
into CPU ones (used only inside :func:`megatron_gr.compat.cpu_mode`)."""

from __future__ import annotations

import functools

import torch
from torch.overrides import TorchFunctionMode

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # megatron passes torch.cuda.current_device() (an int) as a device; in CPU mode that
    # int is 0, which torch would read as cuda:0.
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to CPU.

    Patches: ``torch.zeros(..., device="cuda")`` and every other factory call,
    ``tensor.cuda()``, ``tensor.to("cuda")``; and ``tensor.type()`` answers with the
    CUDA type name, because megatron's optimizers and grad clipping assert
    ``param.type() == 'torch.cuda.FloatTensor'``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        return func(*args, **kwargs)


def in_cuda_to_cpu_mode(backward):
    """``backward`` (of an autograd Function) run inside :class:`CudaToCpuMode`: autograd does
    not carry Python function modes into the backward pass."""

    @functools.wraps(backward)
    def run(ctx, *grads):
        with CudaToCpuMode():
            return backward(ctx, *grads)

    return run
