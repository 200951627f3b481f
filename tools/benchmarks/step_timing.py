"""What the benchmarks share: the timing of one training step (the device synchronized
around it), warm-up plus timed steps, the median device time of one op call
(``time_us``: ``mhc_ops.py``, ``keyed_dropout.py``), the synthetic ranking experiment
at long histories that ``ranking_step.py`` and ``ultra_hstu.py`` time, the record of each
step's micro-batches (``e2e_worker.py``, ``profile_train_step.py``) and what counts as a
top-level operator (``host_overhead.py``, ``fp8_linear_host.py``).

Imported by the scripts beside it (their directory is on ``sys.path`` when run).
"""

from __future__ import annotations

import statistics
import time
from typing import Optional

import torch


def time_us(fn, warmup: int, reps: int, device: torch.device) -> float:
    """Median microseconds of ``fn()`` after ``warmup`` calls: CUDA events around each call
    on a GPU, the wall clock on a CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e6)
    return statistics.median(times)


def is_cuda(trainer) -> bool:
    return trainer.runtime.device.type == "cuda"


def timed_step(trainer) -> tuple[float, dict]:
    """One ``trainer.train_step()``: its seconds (queued GPU work finished before and
    after) and its record."""
    cuda = is_cuda(trainer)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    record = trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, record


def time_steps(trainer, *, warmup: int, steps: int) -> tuple[list[float], list[int]]:
    """``warmup`` untimed steps, then the seconds and tokens of ``steps`` steps; the peak
    memory statistics count from the first timed step."""
    for _ in range(warmup):
        timed_step(trainer)
    if is_cuda(trainer):
        torch.cuda.reset_peak_memory_stats()
    times, tokens = [], []
    for _ in range(steps):
        elapsed, record = timed_step(trainer)
        times.append(elapsed)
        tokens.append(record["tokens"])
    return times, tokens


def device_name(trainer) -> str:
    return torch.cuda.get_device_name() if is_cuda(trainer) else "cpu"


def peak_memory_gib(trainer) -> Optional[float]:
    return torch.cuda.max_memory_allocated() / 2**30 if is_cuda(trainer) else None


def long_history_ranking_config(args, *, model: dict, features: Optional[dict] = None) -> dict:
    """Synthetic ranking data where every user has exactly ``args.history`` history events
    and ``args.candidates`` candidates, trained in micro-batches of ``args.users_per_batch``
    users. ``model``: fields added to (or replacing) the shared model section;
    ``features``: the ranking feature groups (None: the section leaves them out)."""
    width = args.hidden // 2  # item and topic tables side by side fill the content width
    warmup = -(-args.history // args.candidates)  # requests before the first sample
    ranking = {} if features is None else {"features": features}
    return {
        "model": {"type": "ranking", "num_layers": args.layers, "hidden_size": args.hidden,
                  "num_attention_heads": args.heads, "qk_head_dim": args.head_dim, "v_head_dim": args.head_dim,
                  "max_seq_len": 2 + args.history + args.candidates, "hidden_dropout": 0.1,
                  "embedding_dropout": 0.1, "num_time_buckets": 64, "time_bucket_fn": "log", **model},
        "embeddings": {"item": {"dim": width}, "topic": {"dim": args.hidden - width}, "segment": {"dim": 16},
                       "activity": {"dim": 16}},
        "ranking": {**ranking, "action_encoder": {"watchtime_thresholds": [5.0], "dim": 16, "mlp_hidden": 128},
                    "content_encoder": {"mlp_hidden": args.hidden}, "tower": {"hidden_sizes": [args.hidden]},
                    "output_postprocessor": "timestamp_layernorm", "num_position_buckets": 512},
        # Histories: exactly `warmup` requests of `candidates` impressions before the first
        # sample request, cut to the latest `history` events by max_seq_len.
        "data": {"ranking": {"synthetic": {"num_users": max(4 * args.users_per_batch, 8), "num_items": 20_000,
                                           "num_topics": 32, "requests_per_user": 3,
                                           "candidates_per_request": args.candidates,
                                           "min_warmup_requests": warmup, "max_warmup_requests": warmup}}},
        "training": {"train_iters": 10**6, "micro_batch_size": args.users_per_batch, "lr": 1e-4, "eval_interval": 0,
                     "device": args.device, "kernel_backend": args.backend, "precision": args.precision},
        "logging": {"progress": "off"},
    }


def under_aten_op(event) -> bool:
    """Whether a torch.profiler event was dispatched inside another aten op (nested), not
    by Python directly: what the host-work counters call top level is the rest."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def record_step_batches(trainer) -> list:
    """The micro-batches of every step the trainer takes from now on, one list per step, in
    the returned list (filled as the steps run; ``clear()`` it to start over)."""
    taken: list = []
    next_step = trainer.loader.next_step

    def recording_next_step():
        batches = next_step()
        taken.append(batches)
        return batches

    trainer.loader.next_step = recording_next_step
    return taken
