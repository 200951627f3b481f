"""Bucketing of time gaps (seconds) for time encodings and relative time bias."""

from __future__ import annotations

import torch

TIME_BUCKET_FNS = ("sqrt", "log", "hstu_log")

# Meta's HSTU reference bucketization is floor(ln(gap) / 0.301): buckets grow by e^0.301 ~ 1.35,
# about 2.3 per doubling of the gap (``log`` has one). Computed as ln(gap) * 1000 / 301 in
# float64: both constants are exact in float32, the type Triton gives float literals, so the
# kernels do the very same float64 operations.
HSTU_LOG_SCALE = (1000.0, 301.0)


def bucketize_time_gaps(gaps: torch.Tensor, num_buckets: int, fn: str) -> torch.Tensor:
    """Maps gaps to bucket ids in [0, num_buckets - 1].

    ``sqrt``: floor(sqrt(|gap|)); ``log``: floor(log2(|gap| + 1)); ``hstu_log``:
    floor(ln(max(|gap|, 1)) / 0.301), the bucketization of the HSTU reference
    implementation (gaps of 0 and 1 s share bucket 0). Gaps past the last bucket share it.
    Works on any integer or float tensor; returns int64.
    """
    gaps = gaps.abs().to(torch.float64)
    if fn == "sqrt":
        buckets = torch.sqrt(gaps)
    elif fn == "log":
        buckets = torch.log2(gaps + 1.0)
    elif fn == "hstu_log":
        buckets = torch.log(gaps.clamp(min=1.0)) * HSTU_LOG_SCALE[0] / HSTU_LOG_SCALE[1]
    else:
        raise ValueError(f"time bucket fn={fn!r}: choose one of {TIME_BUCKET_FNS}")
    return buckets.floor().clamp(max=num_buckets - 1).to(torch.int64)
