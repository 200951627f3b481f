"""HSTU attention written out the slow, obvious way: the mask of one sequence pair by pair
from the documented rules, the relative-bias formula pair by pair, and attention one
sequence at a time in float64 without padding. The references the jagged op and the STU
layer are tested against."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from megatron_gr.ops.relative_bias import RelativeBiasInputs


def rule_mask(length: int, *, causal: bool, window: int, contextual: int, targets: int, prefix: int = 0) -> torch.Tensor:
    """The mask of one sequence, one pair at a time, straight from the documented rules."""
    history = length - targets
    mask = torch.zeros(length, length, dtype=torch.bool)
    for i, j in itertools.product(range(length), range(length)):
        if j < contextual:
            mask[i, j] = True
        elif j >= history:
            mask[i, j] = i == j
        else:
            pi, pj = min(i, history), min(j, history)
            ok = pj <= pi if causal else True
            if window > 0:
                ok = ok and (abs(pi - pj) <= window or j < prefix)
            mask[i, j] = ok
    return mask


def relative_bias_pairs(rel: RelativeBiasInputs, lengths) -> torch.Tensor:
    """The documented bias formula, one pair at a time: [B, N, N] (float64)."""
    n = max(lengths)
    bias = torch.zeros(len(lengths), n, n, dtype=torch.float64)
    num_pos, num_time = rel.position_weights.numel(), rel.time_weights.numel()
    start = 0
    for b, m in enumerate(lengths):
        ts = rel.timestamps[start : start + m].tolist()
        for i, j in itertools.product(range(m), range(m)):
            gap = abs(ts[i] - ts[j])
            bucket = math.isqrt(gap) if rel.time_bucket_fn == "sqrt" else (gap + 1).bit_length() - 1
            bias[b, i, j] = rel.position_weights[min(abs(i - j), num_pos - 1)] + rel.time_weights[min(bucket, num_time - 1)]
        start += m
    return bias


def dense_attention(q, k, v, lengths, *, alpha, max_seq_len, normalizer, causal, window, contextual, targets, bias,
                    prefix=0):
    """One sequence at a time, no padding."""
    outs, start = [], 0
    for b, n in enumerate(lengths):
        qs, ks, vs = q[start : start + n], k[start : start + n], v[start : start + n]
        scores = torch.einsum("ihd,jhd->hij", qs.double(), ks.double()) * alpha
        if bias is not None:
            scores = scores + bias[b, :n, :n].double()
        t = targets[b] if targets is not None else 0
        mask = rule_mask(n, causal=causal, window=window, contextual=contextual, targets=t, prefix=prefix)
        weights = F.silu(scores) * mask / (max_seq_len if normalizer == "max_seq_len" else n)
        outs.append(torch.einsum("hij,jhd->ihd", weights, vs.double()))
        start += n
    return torch.cat(outs)
