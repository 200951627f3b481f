"""The one seeding policy of a run: every random stream is seeded by ``derive_seed(run seed,
*key)``, a function of the run seed and the stream's name only — never of the rank, the
pipeline stage or the order in which streams are used. So each parameter's initial values,
the data order and the sampling of a step are the same on every parallel layout.

Keys in use: ``("init", <module name>)`` for initial weights (a layer is named by its global
layer number, a table by its name), ``("data", epoch)`` for the order of the training
stream, ``("negatives", step)`` and ``("dropout", step)`` for what a step draws (a step is
named by its first position in the stream), ``("process",)`` and ``("megatron",)`` for the
global generators (``training/runtime.py``). Dynamic tables seed their rows from the run seed
too (``embeddings/dynamic``).
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Iterator, Optional, Union

import numpy as np
import torch

Key = Union[str, int]


def derive_seed(seed: int, *key: Key) -> int:
    """A 63-bit seed from the run seed and a key of strings and non-negative ints."""
    words = [int(seed)]
    for part in key:
        words.append(zlib.crc32(part.encode()) if isinstance(part, str) else int(part))
        words.append(1 if isinstance(part, str) else 0)  # "1" and 1 are different keys
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


@contextlib.contextmanager
def keyed_init(seed: Optional[int], *key: Key) -> Iterator[None]:
    """Runs the block with torch's CPU generator seeded by ``derive_seed(seed, "init",
    *key)`` and restores the generator afterwards; a no-op when ``seed`` is None.

    Weights are drawn on the CPU (``use_cpu_initialization``, also for the tensor-parallel
    linears, which draw the full matrix and keep their slice), so the CPU generator is all
    the state a module's initial values depend on: a module built under its key gets the
    same values wherever, and whenever, it is built.
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(derive_seed(seed, "init", *key))  # the CPU one only
        yield
