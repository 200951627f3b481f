"""One training recipe per model family, registered by name; ``model.type`` picks it.

The trainer (``megatron_gr.training``) runs any :class:`TrainSpec` and never names a model:
the spec reads its data, builds this rank's pipeline stage, turns a micro-batch's model
output into the loss megatron reduces (sum and count: megatron's per-token loss) and into
evaluation statistics, and says which validation metric selects the best checkpoint.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Protocol

import torch
from megatron.core.transformer.module import MegatronModule

LossOutput = tuple[torch.Tensor, torch.Tensor, dict]  # (sum, count, {"loss_sum_and_tokens": [2]})


class TrainingStream(Protocol):
    """A rank's training micro-batches, one optimizer step at a time; its state is its
    stream position, saved in checkpoints."""

    consumed_samples: int

    def next_step(self) -> list: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Dataset(abc.ABC):
    """What a spec reads once per run (on every rank): the splits and the facts the run plan
    checks."""

    @property
    @abc.abstractmethod
    def num_items(self) -> int:
        """Items the item table must hold (dense ids 1..num_items)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line: what the run trains on."""

    def table_rows(self) -> dict[str, int]:
        """Rows each plain embedding table needs (ids 0..rows - 1), by table name; the run
        plan checks the configured sizes against them."""
        return {"item": self.num_items + 1}


@dataclass(frozen=True)
class StageRequest:
    """What a spec needs to build this rank's pipeline stage."""

    plan: "object"  # megatron_gr.training.plan.RunPlan (training imports models, not back)
    dataset: Dataset
    pre_process: bool
    post_process: bool


@dataclass(frozen=True)
class TrainSpec:
    name: str
    build_dataset: Callable[["object"], Dataset]
    """ExperimentConfig -> the data (raises DataFormatError/ConfigError on bad input)."""
    build_stage: Callable[[StageRequest], MegatronModule]
    """This rank's pipeline stage, with its keyed initial values."""
    training_stream: Callable[["object", Dataset, int, int], TrainingStream]
    """(plan, dataset, data-parallel rank, data-parallel size) -> the rank's micro-batches."""
    evaluation_batches: Callable[["object", Dataset, str, int, int], Iterator]
    """(plan, dataset, split, data-parallel rank, size) -> the rank's evaluation batches."""
    loss: Callable[[torch.Tensor], LossOutput]
    """A training micro-batch's model output -> (loss sum, count, {"loss_sum_and_tokens"})."""
    evaluation_statistics: Callable[[torch.Tensor], LossOutput]
    """An evaluation micro-batch's model output -> megatron's loss triple whose dict holds
    the statistics to reduce."""
    reduce_statistics: Callable[[list[dict], "object"], dict[str, float]]
    """(the statistics of this rank's evaluation micro-batches (last pipeline stage, first
    tensor rank; empty elsewhere), the run plan) -> the metrics, equal on every rank
    (collective)."""
    selection_metric: str
    """Validation metric (higher is better) that selects the best weights."""
    headline_metrics: tuple[str, ...]
    """Metrics of the final summary line."""
    evaluation_note: str = ""
    """How the metrics are computed, for the final summary line."""
    checkpoint_dataset: Optional[Callable[["object", dict], Dataset]] = None
    """(ExperimentConfig, a checkpoint's model facts) -> a stand-in for the data holding
    only what ``build_stage`` needs, for tools that rebuild the model from a checkpoint
    alone (``megatron-gr checkpoint reshard``). None: those tools refuse the model type."""
    serving_module: Optional[Callable[..., torch.nn.Module]] = None
    """(bare model, **options) -> a plain ``torch.nn.Module`` of the serving computation
    that ``torch.export`` traces (``megatron-gr export``). None: not exportable yet."""


_REGISTRY: dict[str, TrainSpec] = {}


def register(spec: TrainSpec) -> TrainSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"a TrainSpec named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_train_spec(name: str) -> TrainSpec:
    _load_builtin_specs()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"no model type {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


def registered_types() -> tuple[str, ...]:
    _load_builtin_specs()
    return tuple(sorted(_REGISTRY))


def _load_builtin_specs() -> None:
    from megatron_gr.models import retrieval_spec  # noqa: F401  (registers "retrieval")
    from megatron_gr.models.ranking import spec  # noqa: F401  (registers "ranking")

