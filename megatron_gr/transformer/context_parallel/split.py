"""Which tokens of a jagged micro-batch each context-parallel rank computes, and which keys
it must fetch from the others. Host-side, deterministic: every rank of the group computes
the same plan from the micro-batch's lengths, so no rank has to be told its share.

Sequences longer than ``split_threshold`` are cut into ``2 x CP`` chunks of (nearly) equal
length and rank r holds chunks r and ``2 CP - 1 - r``: under a causal mask a chunk's cost
grows with its index, so every rank gets one cheap and one expensive chunk. Shorter
sequences stay whole, each on the rank with the least attention cost so far (sum of
squared lengths; longest first, ties to the lower rank). With CP = 2 and one sequence of
8 tokens (threshold 4) and three of 3, 2 and 2 tokens::

    sequence 0 (split)  chunks [0 1] [2 3] [4 5] [6 7]  ->  rank 0: [0 1] [6 7]   rank 1: [2 3] [4 5]
    sequences 1, 2, 3   whole (costs 9, 4, 4)           ->  rank 0: seq 1          rank 1: seq 2, seq 3

A rank's tokens keep the batch order. Each of its *segments* (a chunk or a whole sequence)
attends to the keys of its sequence at positions ``[0, key_len)``: up to the segment's end
under a causal mask (and at least the contextual prefix), the whole sequence otherwise.
Keys of split sequences come from all ranks: each rank contributes its split tokens to an
all-gather (padded to the longest contribution, ``send_len``), and ``key_source`` picks
every key either from the rank's own tokens or from that gathered buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ContextSplit:
    """This rank's share of a micro-batch (host arrays, int64)."""

    token_index: np.ndarray
    """``[T_r]`` the micro-batch tokens this rank holds, ascending."""

    segment_sequence: np.ndarray
    """``[S]`` the sequence of each local segment."""

    segment_start: np.ndarray
    """``[S]`` position of each segment's first token in its sequence."""

    segment_length: np.ndarray
    """``[S]`` tokens of each segment (their local offsets are the cumulative sum)."""

    sequence_length: np.ndarray
    """``[S]`` length of each segment's whole sequence."""

    key_length: np.ndarray
    """``[S]`` keys of each segment: positions ``[0, key_length)`` of its sequence."""

    key_token: np.ndarray
    """``[Tk]`` the micro-batch token of each key (segment by segment)."""

    key_source: np.ndarray
    """``[Tk]`` where each key comes from: a local token index when ``key_is_remote`` is
    False, else a slot of the gathered buffer (``sender * send_len + position``)."""

    key_is_remote: np.ndarray
    """``[Tk]`` bool: the key is another rank's token."""

    key_is_second: np.ndarray
    """``[Tk]`` bool: the key belongs to a sequence's second segment on this rank. Within
    each of the two groups every token appears at most once, so key gradients are summed
    back into tokens by two scatters without atomics (deterministic)."""

    send_index: np.ndarray
    """``[n]`` local tokens that belong to split sequences, in the order the gathered buffer
    holds them."""

    send_len: int
    """Slots per rank in the gathered buffer: the most split tokens any rank holds."""

    last_token: np.ndarray
    """``[E]`` local index of the last token of each sequence that ends on this rank."""

    last_sequence: np.ndarray
    """``[E]`` those sequences, ascending."""

    @property
    def num_tokens(self) -> int:
        return int(self.token_index.size)

    @property
    def num_keys(self) -> int:
        return int(self.key_source.size)


def _chunk_bounds(length: int, num_chunks: int) -> np.ndarray:
    """``[num_chunks + 1]`` boundaries of nearly equal chunks (the longer ones last)."""
    return (np.arange(num_chunks + 1, dtype=np.int64) * length) // num_chunks


def _whole_owners(lengths: np.ndarray, whole: np.ndarray, size: int) -> np.ndarray:
    """Rank of each whole sequence (-1 for split ones): longest first, each to the rank
    with the least sum of squared lengths (split sequences load every rank equally)."""
    owners = np.full(lengths.size, -1, dtype=np.int64)
    loads = np.zeros(size, dtype=np.float64)
    cost = lengths.astype(np.float64) ** 2
    for b in np.flatnonzero(whole)[np.argsort(-cost[whole], kind="stable")]:
        rank = int(np.argmin(loads))
        owners[b] = rank
        loads[rank] += cost[b]
    return owners


def _chunks_of(rank: int, size: int) -> tuple[int, int]:
    return rank, 2 * size - 1 - rank


def _send_offsets(bounds: dict, size: int) -> tuple[np.ndarray, int]:
    """``[size, S + 1]``: where each rank's tokens of each split sequence start in its part of
    the gathered buffer (its two chunks of every split sequence, in batch order), and the
    buffer's part per rank (the most any rank sends)."""
    sent = np.zeros((size, len(bounds)), dtype=np.int64)
    for i, chunk_bounds in enumerate(bounds.values()):
        chunk = np.diff(chunk_bounds)
        for r in range(size):
            sent[r, i] = sum(int(chunk[c]) for c in _chunks_of(r, size))
    before = np.concatenate([np.zeros((size, 1), dtype=np.int64), np.cumsum(sent, axis=1)], axis=1)
    return before, int(before[:, -1].max()) if bounds else 0


def _segments(lengths, split, owners, bounds, rank: int, size: int) -> list[tuple[int, int, int, int]]:
    """``(sequence, start, length, which)`` of the rank's segments in batch order; ``which``
    is -1 for a whole sequence, 0 / 1 for the rank's first / second chunk of a split one."""
    segments = []
    for b in range(lengths.size):
        if split[b]:
            for which, c in enumerate(_chunks_of(rank, size)):
                segments.append((b, int(bounds[b][c]), int(bounds[b][c + 1] - bounds[b][c]), which))
        elif owners[b] == rank:
            segments.append((b, 0, int(lengths[b]), -1))
    return segments


def _split_keys(keys, chunk_bounds, first_local: int, second_local: int, sent_before: np.ndarray, send_len: int,
                rank: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the keys at positions ``keys`` of a split sequence come from: ``(source,
    remote)``. Local keys are rows of the rank's two chunks (starting at local rows
    ``first_local`` and ``second_local``); remote ones are slots of the gathered buffer, where
    every sender put its lower chunk, then its upper one, after its earlier split sequences
    (``sent_before[sender]`` tokens)."""
    num_chunks = 2 * size
    chunk = np.searchsorted(chunk_bounds, keys, side="right") - 1
    owner = np.minimum(chunk, num_chunks - 1 - chunk)  # rank r holds chunks r and 2 CP - 1 - r
    first_own, second_own = _chunks_of(rank, size)
    local = np.where(
        chunk == first_own,
        first_local + keys - chunk_bounds[first_own],
        second_local + keys - chunk_bounds[second_own],
    )
    lower_len = chunk_bounds[owner + 1] - chunk_bounds[owner]
    within = np.where(chunk == owner, 0, lower_len) + keys - chunk_bounds[chunk]
    remote = owner != rank
    return np.where(remote, owner * send_len + sent_before[owner] + within, local), remote


def plan_context_split(
    lengths, *, size: int, rank: int, split_threshold: int, causal: bool = True, contextual_len: int = 0
) -> ContextSplit:
    """The share of ``rank`` (of ``size``) of a micro-batch of sequences of ``lengths``.

    Args:
        lengths: ``[B]`` tokens per sequence.
        split_threshold: sequences longer than this are split into ``2 x size`` chunks.
        causal, contextual_len: the attention mask, which decides how many keys a chunk needs.
    """
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    split = (lengths > split_threshold) & (size > 1)
    owners = _whole_owners(lengths, ~split, size)
    bounds = {int(b): _chunk_bounds(int(lengths[b]), 2 * size) for b in np.flatnonzero(split)}
    sent_before, send_len = _send_offsets(bounds, size)
    split_index = {b: i for i, b in enumerate(bounds)}

    segments = _segments(lengths, split, owners, bounds, rank, size)
    seg = np.asarray(segments, dtype=np.int64).reshape(-1, 4)
    seq_of, start, length = seg[:, 0], seg[:, 1], seg[:, 2]
    local_start = np.concatenate([[0], np.cumsum(length)]).astype(np.int64)
    full = lengths[seq_of]
    if causal:
        key_length = np.minimum(full, np.maximum(start + length, contextual_len))
    else:
        key_length = full.copy()
    key_length = np.where(length > 0, key_length, 0)  # an empty chunk (L < 2 CP) needs no keys

    sources, remote, second, send = [], [], [], []
    for s, (b, _, n, which) in enumerate(segments):
        keys = np.arange(key_length[s], dtype=np.int64)
        if which < 0:  # a whole sequence: its keys are its own tokens
            sources.append(local_start[s] + keys)
            remote.append(np.zeros(keys.size, dtype=bool))
        else:
            first = s - which  # the rank's two chunks of a sequence are consecutive segments
            source, is_remote = _split_keys(
                keys, bounds[b], local_start[first], local_start[first + 1], sent_before[:, split_index[b]],
                send_len, rank, size,
            )
            sources.append(source)
            remote.append(is_remote)
        second.append(np.full(keys.size, which == 1, dtype=bool))
        if which == 0:  # both chunks go to the gathered buffer, in local order
            send.append(np.arange(local_start[s], local_start[s] + n + int(length[s + 1]), dtype=np.int64))

    ends = [s for s, (b, seg_start, n, _) in enumerate(segments) if n and seg_start + n == lengths[b]]
    empty = np.zeros(0, dtype=np.int64)
    return ContextSplit(
        token_index=_concat([offsets[b] + np.arange(s, s + n, dtype=np.int64) for b, s, n, _ in segments]),
        segment_sequence=seq_of,
        segment_start=start,
        segment_length=length,
        sequence_length=full,
        key_length=key_length.astype(np.int64),
        key_token=_concat([offsets[b] + np.arange(m, dtype=np.int64) for b, m in zip(seq_of, key_length)]),
        key_source=_concat(sources),
        key_is_remote=_concat(remote, dtype=bool),
        key_is_second=_concat(second, dtype=bool),
        send_index=_concat(send),
        send_len=send_len,
        last_token=np.asarray([local_start[s] + segments[s][2] - 1 for s in ends], dtype=np.int64),
        last_sequence=np.asarray([segments[s][0] for s in ends], dtype=np.int64) if ends else empty,
    )


def _concat(parts: list, dtype=np.int64) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)
