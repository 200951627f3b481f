"""The golden-value suite: named configs, how each runs, what it records, and how a run is
compared with its stored golden values.

A case is a config under ``tests/functional/configs/<name>.yaml`` plus how to launch it
(:class:`GoldenCase`: ranks, a resume point, GPU). Its golden values live in
``tests/functional/golden/<name>.json``; ``python tools/make_golden.py --name NAME`` (or
``--all``) regenerates them. Adding a case is a config, an entry in :data:`CASES` and one
``make_golden`` call: ``test_golden_suite.py`` iterates the list.

Recorded per run: every step's loss, gradient norm and learning rate, every evaluation's
metrics (periodic validation and the final valid/test evaluation of the best weights), and
on a GPU the median step time and the peak memory.

Tolerance policy (one place; docs/guide/golden.md explains it):

- CPU, fp32, dropout off (every CPU case): the same code and seeds compute the same
  numbers up to the order of floating-point sums, which the CPU's SIMD width and the
  parallel layout change. Losses and learning rates are compared relatively (1e-5: a
  changed model, data order, sampling or optimizer moves them by far more; reordered sums
  after a few steps by ~1e-7), gradient norms with 1e-4. Ranking metrics count targets
  at integer ranks: a near-tie resolved the other way moves one user's target by one
  rank, which changes HR/NDCG/MRR by at most 1/users; they are compared with that
  absolute bound (users = the evaluated users recorded in the golden file). AUC and GAUC
  (ranking) move by far less when two candidates swap: 1 / (positives x negatives).
- GPU, bf16 (FP8 linears included): stated bands: losses relative 2e-2, gradient norms 1e-1, learning rates
  1e-6, metrics absolute 2e-2; the median step time may be at most 1.3x the golden one
  (faster passes) and the peak memory at most 1.1x + 64 MiB.

Cases not yet in the suite (:data:`PENDING`) are the model families still being built;
each gets a config and an entry here when it lands on main.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tests.support.paths import REPO_ROOT, ml100k_dir

CONFIGS = REPO_ROOT / "tests" / "functional" / "configs"
GOLDEN = REPO_ROOT / "tests" / "functional" / "golden"
WARMUP_STEPS = 3  # steps left out of the GPU step time (compilation, autotuning)


@dataclass(frozen=True)
class GoldenCase:
    name: str
    """Its config is ``configs/<name>.yaml``, its golden values ``golden/<name>.json``."""
    ranks: int = 1
    """gloo ranks (more than one: through the multi-rank harness, all such cases of one
    world size in one launch)."""
    resume_at: Optional[int] = None
    """Stop at this step (saving), then resume in a new trainer and train to the end."""
    gpu: bool = False
    """Runs only where CUDA is available; also records step time and peak memory."""
    same_as: Optional[str] = None
    """Another case whose training this one must reproduce (e.g. a resumed run and the
    uninterrupted one)."""
    reads_ml100k: bool = True
    """Trains on ML-100K (its path is passed as ``data.path``); False: on data its config
    generates in memory."""


CASES = (
    GoldenCase("retrieval_hstu"),
    GoldenCase("hstu_mhc_recompute"),
    GoldenCase("retrieval_hstu_resume", resume_at=3, same_as="retrieval_hstu"),
    GoldenCase("tp2_pp2_sp", ranks=4, same_as="retrieval_hstu"),
    GoldenCase("tp2_dp2_dynamic", ranks=4),
    GoldenCase("cp2_dp2", ranks=4, same_as="retrieval_hstu"),
    GoldenCase("hstu_query_time"),
    GoldenCase("sasrec"),
    GoldenCase("ranking"),
    GoldenCase("ultra_hstu", reads_ml100k=False),
    GoldenCase("retrieval_hstu_gpu", gpu=True),
    GoldenCase("retrieval_hstu_fp8_gpu", gpu=True),
)
PENDING: dict[str, str] = {}


def case(name: str) -> GoldenCase:
    for entry in CASES:
        if entry.name == name:
            return entry
    raise KeyError(f"no golden case {name!r}; cases: {', '.join(c.name for c in CASES)}")


def config_path(entry: GoldenCase) -> Path:
    """A resumed case trains the config of the case it must reproduce."""
    return CONFIGS / f"{entry.same_as if entry.resume_at else entry.name}.yaml"


def golden_path(name: str) -> Path:
    return GOLDEN / f"{name}.json"


def read_golden(name: str) -> dict:
    path = golden_path(name)
    if not path.is_file():
        raise AssertionError(f"{path} is missing: generate it with `python tools/make_golden.py --name {name}`")
    return json.loads(path.read_text())


def data_path() -> Path:
    """ML-100K ($MEGATRON_GR_ML100K); a missing copy fails the suite rather than skip it."""
    path = ml100k_dir()
    if not (path / "u.data").is_file():
        raise AssertionError(f"ML-100K not found at {path}: set MEGATRON_GR_ML100K to the directory holding u.data")
    return path


# ---------------------------------------------------------------------- running
def run_case(name: str, workdir: str | Path, data: str | Path) -> Optional[dict]:
    """Runs the case in this process (in the process group it is in, which must have the
    case's world size); returns the record on rank 0, None on the other ranks."""
    import torch
    import torch.distributed as dist

    from megatron_gr.config import resolve_config
    from megatron_gr.training.trainer import Trainer

    entry = case(name)
    workdir = Path(workdir) / name
    workdir.mkdir(parents=True, exist_ok=True)
    metrics = workdir / "metrics.jsonl"
    overrides = [(["data", "path"], str(data))] if entry.reads_ml100k else []
    overrides += [(["logging", "metrics_file"], str(metrics))]
    if entry.resume_at:
        overrides += [(["checkpoint", "save"], str(workdir / "ckpt")), (["training", "exit_interval"], entry.resume_at)]
    config = resolve_config(str(config_path(entry)), overrides)
    if torch.cuda.is_available() and config.training.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(config)
    users = trainer.dataset.num_users
    results = trainer.train()
    if entry.resume_at:
        assert results.get("iteration") == entry.resume_at, f"the first part of {name} did not stop at {entry.resume_at}: {results}"
        kept = overrides[: 1 + entry.reads_ml100k]  # data and metrics file
        resumed = resolve_config(str(config_path(entry)), kept + [(["checkpoint", "load"], str(workdir / "ckpt")),
                                                                  (["checkpoint", "save"], str(workdir / "ckpt"))])
        results = Trainer(resumed).train()
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return _record(metrics, results, users=users, gpu=entry.gpu)


def run_cases_on_ranks(job: dict) -> dict:
    """On every rank of a multi-rank launch: each named case in turn."""
    return {name: run_case(name, job["workdir"], job["data"]) for name in job["names"]}


def _record(metrics: Path, results: dict, *, users: int, gpu: bool) -> dict:
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    record = {
        "eval_users": users,
        "steps": [{"step": r["step"], "loss": r["loss"], "grad_norm": r["grad_norm"], "lr": r["lr"]} for r in steps],
        "evaluations": [r for r in lines if "split" in r],
        "final": results,
    }
    if gpu:
        times = [r["step_time_s"] for r in steps[WARMUP_STEPS:]]
        record["step_time_s"] = statistics.median(times) if times else None
        record["peak_memory_gib"] = max(r.get("peak_memory_gib", 0.0) for r in steps)
    return record


def run_all(names: list[str], workdir: Path) -> dict[str, dict]:
    """Runs the named cases, single-rank ones in this process, the others in one launch
    per world size; ``{name: record}``."""
    from megatron_gr.training.runtime import shutdown
    from tests.support.multirank import run_ranks

    data = data_path()
    records = {}
    for ranks in sorted({case(name).ranks for name in names}):
        group = [name for name in names if case(name).ranks == ranks]
        if ranks == 1:
            for name in group:
                try:
                    records[name] = run_case(name, workdir, data)
                finally:
                    shutdown()
        else:
            job = {"names": group, "workdir": str(workdir), "data": str(data)}
            records.update(run_ranks(ranks, "tests.functional.golden:run_cases_on_ranks", job, workdir=workdir))
    return records


# -------------------------------------------------------------------- comparing
@dataclass(frozen=True)
class Tolerance:
    loss_rtol: float
    grad_norm_rtol: float
    lr_rtol: float
    metric_atol: Optional[float]  # None: one user's rank (1 / evaluated users)
    time_ratio: Optional[float] = None
    memory_ratio: Optional[float] = None
    memory_slack_gib: float = 0.0625


CPU_FP32 = Tolerance(loss_rtol=1e-5, grad_norm_rtol=1e-4, lr_rtol=1e-5, metric_atol=None)
GPU_BF16 = Tolerance(loss_rtol=2e-2, grad_norm_rtol=1e-1, lr_rtol=1e-6, metric_atol=2e-2, time_ratio=1.3, memory_ratio=1.1)


def tolerance_for(entry: GoldenCase) -> Tolerance:
    return GPU_BF16 if entry.gpu else CPU_FP32


def differences(run: dict, golden: dict, tolerance: Tolerance) -> list[str]:
    """Every way ``run`` departs from ``golden`` beyond ``tolerance`` (empty: it matches)."""
    problems = []

    def close(what, actual, expected, rtol=0.0, atol=0.0):
        if actual is None or expected is None:
            if actual is not expected:
                problems.append(f"{what}: {actual} != {expected}")
        elif not abs(actual - expected) <= atol + rtol * abs(expected) + 1e-12:
            problems.append(f"{what}: {actual!r} != golden {expected!r} (tolerance rel {rtol:g}, abs {atol:g})")

    if [s["step"] for s in run["steps"]] != [s["step"] for s in golden["steps"]]:
        problems.append(f"steps {[s['step'] for s in run['steps']]} != golden {[s['step'] for s in golden['steps']]}")
        return problems
    for mine, gold in zip(run["steps"], golden["steps"]):
        close(f"step {gold['step']} loss", mine["loss"], gold["loss"], rtol=tolerance.loss_rtol)
        close(f"step {gold['step']} grad_norm", mine["grad_norm"], gold["grad_norm"], rtol=tolerance.grad_norm_rtol)
        close(f"step {gold['step']} lr", mine["lr"], gold["lr"], rtol=tolerance.lr_rtol, atol=1e-12)
    atol = tolerance.metric_atol if tolerance.metric_atol is not None else 1.0 / golden["eval_users"]
    keys = [(e["step"], e["split"]) for e in golden["evaluations"]]
    if [(e["step"], e["split"]) for e in run["evaluations"]] != keys:
        problems.append(f"evaluations {[(e['step'], e['split']) for e in run['evaluations']]} != golden {keys}")
        return problems
    for mine, gold in zip(run["evaluations"], golden["evaluations"]):
        for metric, value in gold.items():
            if metric not in ("step", "split"):
                close(f"{gold['split']} {metric} at step {gold['step']}", mine.get(metric), value, atol=atol)
    if tolerance.time_ratio is not None and golden.get("step_time_s"):
        if run["step_time_s"] > tolerance.time_ratio * golden["step_time_s"]:
            problems.append(f"median step time {run['step_time_s']:.4f} s > {tolerance.time_ratio} x golden {golden['step_time_s']:.4f} s")
    if tolerance.memory_ratio is not None and golden.get("peak_memory_gib"):
        bound = tolerance.memory_ratio * golden["peak_memory_gib"] + tolerance.memory_slack_gib
        if run["peak_memory_gib"] > bound:
            problems.append(f"peak memory {run['peak_memory_gib']:.3f} GiB > {bound:.3f} GiB (golden {golden['peak_memory_gib']:.3f})")
    return problems
