"""The per-batch inputs a captured CUDA graph reads, in static tensors the runner rewrites
before every replay (``training/cuda_graphs.py``).

A replayed graph reads the memory of its capture and launches its kernels with the host
arguments of its capture. So everything that changes from one micro-batch to the next is a
device tensor written in place: the padded batch's offsets and timestamps, its query
timestamps (``time_bias_origin='query'``), the tokens' dropout keys (``token_keys`` and
this rank's ``local_token_keys``; padding keys are negative, as ``TokenSplit`` lays them
out) and the step's dropout stream words of every site (``dropout_words``, a ``[sites, 3]``
table: the kernels read the words from it instead of a host seed, so every step draws its
own masks, the same as the eager step's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_gr.transformer.dropout_sites import dropout_word_table
from megatron_gr.transformer.jagged_seq_params import JaggedSeqParams


class WordTables:
    """The step's ``[sites, 3]`` dropout word table on the host, computed once per seed
    (every micro-batch of a step shares the seed) and pinned, so that copying it to a
    captured set does not wait for the device."""

    def __init__(self, sites: int, *, pin: bool):
        self.sites, self.pin = sites, pin
        self.seed: Optional[int] = None
        self.table: Optional[torch.Tensor] = None

    def for_seed(self, seed: int) -> torch.Tensor:
        if seed != self.seed:
            table = dropout_word_table(seed, self.sites)
            self.table, self.seed = (table.pin_memory() if self.pin else table), seed
        return self.table


@dataclass
class StaticBatch:
    """The static inputs of one captured set (one bucket, one in-flight slot)."""

    offsets: torch.Tensor  # [capacity + 1] int64
    timestamps: torch.Tensor  # [bucket] int64
    token_keys: torch.Tensor  # [bucket] int64
    local_token_keys: torch.Tensor  # [bucket / sequence-parallel size] int64
    words: torch.Tensor  # [sites, 3] int64
    query_timestamps: Optional[torch.Tensor] = None  # [bucket] int64, when the layers read them
    seed: Optional[int] = None  # the seed whose words ``words`` holds (None: capture's)

    @classmethod
    def sample(cls, offsets: torch.Tensor, *, bucket: int, split: int, sites: int, query_time: bool,
               device: torch.device) -> "StaticBatch":
        """The capture's batch: ``offsets`` of ``bucket`` tokens, zero times, padding keys."""
        keys = -1 - torch.arange(bucket, dtype=torch.int64, device=device)
        zeros = torch.zeros(bucket, dtype=torch.int64, device=device)
        return cls(
            offsets=offsets, timestamps=zeros, token_keys=keys, local_token_keys=keys[: bucket // split].clone(),
            words=torch.zeros(sites, 3, dtype=torch.int64, device=device),
            query_timestamps=zeros.clone() if query_time else None,
        )

    def fits(self, params: JaggedSeqParams) -> bool:
        """Whether ``params`` (a padded training batch) can be written into these tensors."""
        return (
            params.offsets.shape == self.offsets.shape
            and params.num_targets is None and params.context_parallel is None
            and params.token_keys is not None and params.token_keys.shape == self.token_keys.shape
            and params.local_token_keys is not None and params.local_token_keys.shape == self.local_token_keys.shape
            and (params.timestamps is None or params.timestamps.shape == self.timestamps.shape)
            and (self.query_timestamps is None or (
                params.query_timestamps is not None and params.query_timestamps.shape == self.query_timestamps.shape))
        )

    def write(self, params: JaggedSeqParams, words: WordTables) -> None:
        """Copies the batch in (asynchronously; the table only when the seed changed)."""
        _copy(self.offsets, params.offsets)
        if params.timestamps is not None:
            _copy(self.timestamps, params.timestamps)
        if self.query_timestamps is not None:
            _copy(self.query_timestamps, params.query_timestamps)
        _copy(self.token_keys, params.token_keys)
        _copy(self.local_token_keys, params.local_token_keys)
        if params.dropout_seed != self.seed:
            self.words.copy_(words.for_seed(params.dropout_seed), non_blocking=True)
            self.seed = params.dropout_seed

    def seq_params(self, max_len: int) -> JaggedSeqParams:
        """The jagged metadata a captured unit runs with (built inside the capture)."""
        params = JaggedSeqParams.from_offsets(
            self.offsets, max_len, timestamps=self.timestamps, query_timestamps=self.query_timestamps,
            token_keys=self.token_keys, local_token_keys=self.local_token_keys,
        )
        params.dropout_words = self.words
        return params


def _copy(static: torch.Tensor, value: torch.Tensor) -> None:
    if value.data_ptr() != static.data_ptr():
        static.copy_(value)
