"""Peak bytes of live tensors created under a dispatch mode: activation memory on devices
without allocator statistics (the CPU), used by the mHC recompute test and benchmark."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages created while active that are still alive, checked after
    every op. Storages freed by the recompute manager (resized to 0) count 0 bytes until they
    are refilled."""

    def __init__(self):
        super().__init__()
        self._storages = weakref.WeakSet()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._storages.add(leaf.untyped_storage())
        self.peak = max(self.peak, self.current())
        return out

    def current(self) -> int:
        return sum(s.nbytes() for s in list(self._storages))
