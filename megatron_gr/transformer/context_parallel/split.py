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
    num_chunks = 2 * size

    # Every rank's split tokens, sequence by sequence, in the gathered buffer's order.
    split_ids = np.flatnonzero(split)
    bounds = {int(b): _chunk_bounds(int(lengths[b]), num_chunks) for b in split_ids}
    sent = np.zeros((size, split_ids.size), dtype=np.int64)  # [sender, split sequence] tokens
    for i, b in enumerate(split_ids):
        chunk = np.diff(bounds[int(b)])
        for r in range(size):
            sent[r, i] = sum(int(chunk[c]) for c in _chunks_of(r, size))
    send_before = np.concatenate([np.zeros((size, 1), dtype=np.int64), np.cumsum(sent, axis=1)], axis=1)
    send_len = int(send_before[:, -1].max()) if split_ids.size else 0
    split_rank = {int(b): i for i, b in enumerate(split_ids)}

    segments = []  # (sequence, start, length, which: -1 whole, 0 / 1 the rank's first / second chunk)
    for b in range(lengths.size):
        if split[b]:
            for which, c in enumerate(_chunks_of(rank, size)):
                segments.append((b, int(bounds[b][c]), int(bounds[b][c + 1] - bounds[b][c]), which))
        elif owners[b] == rank:
            segments.append((b, 0, int(lengths[b]), -1))
    seg = np.asarray(segments, dtype=np.int64).reshape(-1, 4)
    seq_of, start, length = seg[:, 0], seg[:, 1], seg[:, 2]
    local_start = np.concatenate([[0], np.cumsum(length)]).astype(np.int64)
    token_index = np.concatenate(
        [offsets[b] + np.arange(s, s + n, dtype=np.int64) for b, s, n, _ in segments] or [np.zeros(0, np.int64)]
    )
    full = lengths[seq_of]
    if causal:
        key_length = np.minimum(full, np.maximum(start + length, contextual_len))
    else:
        key_length = full.copy()
    key_length = np.where(length > 0, key_length, 0)  # an empty chunk (L < 2 CP) needs no keys

    sources, remote, second, send = [], [], [], []
    for s, (b, seg_start, n, which) in enumerate(segments):
        keys = np.arange(key_length[s], dtype=np.int64)
        if not split[b]:  # a whole sequence: its keys are its own tokens
            sources.append(local_start[s] + keys)
            remote.append(np.zeros(keys.size, dtype=bool))
            second.append(np.zeros(keys.size, dtype=bool))
            continue
        chunk = np.searchsorted(bounds[b], keys, side="right") - 1  # chunk of each key
        owner = np.where(chunk < size, chunk, num_chunks - 1 - chunk)
        first_own, second_own = _chunks_of(rank, size)
        first_seg = s - which  # the rank's two segments of this sequence are consecutive
        local = np.where(
            chunk == first_own,
            local_start[first_seg] + keys - bounds[b][first_own],
            local_start[first_seg + 1] + keys - bounds[b][second_own],
        )
        # In the sender's buffer: its chunks of earlier split sequences, then its lower chunk.
        i = split_rank[b]
        low = np.minimum(chunk, num_chunks - 1 - chunk)  # the sender's lower chunk index = owner
        low_len = bounds[b][low + 1] - bounds[b][low]
        within = np.where(chunk == low, keys - bounds[b][chunk], low_len + keys - bounds[b][chunk])
        slot = owner * send_len + send_before[owner, i] + within
        is_remote = owner != rank
        sources.append(np.where(is_remote, slot, local))
        remote.append(is_remote)
        second.append(np.full(keys.size, which == 1, dtype=bool))
        if which == 0:  # both chunks go to the gathered buffer, in local order
            send.append(np.arange(local_start[s], local_start[s] + n + int(length[s + 1]), dtype=np.int64))

    last_seq, last_tok = [], []
    for s, (b, seg_start, n, _) in enumerate(segments):
        if n and seg_start + n == lengths[b]:
            last_seq.append(b)
            last_tok.append(local_start[s] + n - 1)
    empty = np.zeros(0, dtype=np.int64)
    return ContextSplit(
        token_index=token_index,
        segment_sequence=seq_of,
        segment_start=start,
        segment_length=length,
        sequence_length=full,
        key_length=key_length.astype(np.int64),
        key_token=np.concatenate([offsets[b] + np.arange(m, dtype=np.int64) for b, m in zip(seq_of, key_length)] or [empty]),
        key_source=np.concatenate(sources) if sources else empty,
        key_is_remote=np.concatenate(remote) if remote else np.zeros(0, dtype=bool),
        key_is_second=np.concatenate(second) if second else np.zeros(0, dtype=bool),
        send_index=np.concatenate(send) if send else empty,
        send_len=send_len,
        last_token=np.asarray(last_tok, dtype=np.int64),
        last_sequence=np.asarray(last_seq, dtype=np.int64),
    )
