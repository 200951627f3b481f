"""The training recipe of DLRM-HSTU ranking (``model.type: ranking``): per-user requests
of candidates with per-task labels, a weighted multi-task loss per candidate, AUC / GAUC /
log loss / MSE over every data-parallel rank; the selection task's validation AUC picks the
best weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from megatron.core import parallel_state

from megatron_gr.config.errors import ConfigError
from megatron_gr.data.loader import PARTITIONS
from megatron_gr.data.ranking.impressions import ImpressionColumns, read_impressions
from megatron_gr.data.ranking.indexed import IndexedSamples, TaskLabel, index_samples
from megatron_gr.data.ranking.loader import RankingTrainingBatches, SequenceLayout, ranking_evaluation_batches
from megatron_gr.data.ranking.movielens import read_movielens_ranking
from megatron_gr.data.ranking.samples import RankingSamples
from megatron_gr.data.ranking.source import resolve_ranking_source
from megatron_gr.data.ranking.synthetic import generate_ranking
from megatron_gr.embeddings.builder import build_table
from megatron_gr.models.ranking.metrics import auc, gather_rows, task_metrics
from megatron_gr.models.ranking.model import CandidateScores, DLRMHSTUModel
from megatron_gr.models.ranking.serving import RankingServing
from megatron_gr.models.registry import Dataset, StageRequest, TrainSpec, register


@dataclass
class RankingDataset(Dataset):
    data: IndexedSamples
    layout: SequenceLayout
    source: str

    @property
    def num_items(self) -> int:
        """Distinct ids of the first candidate feature's table."""
        return self.data.tables[self.data.candidate_tables[0]].num_items

    @property
    def num_users(self) -> int:
        return int(np.unique(self.data.samples.user_ids).size)

    def table_rows(self) -> dict[str, int]:
        return {name: space.num_items + 1 for name, space in self.data.tables.items()}

    def vocabulary(self, table: str) -> torch.Tensor:
        """Every id of ``table`` in its keys (a raw-keyed table reads them once to evaluate)."""
        return self.data.tables[table].corpus()

    def describe(self) -> str:
        samples = self.data.samples
        counts = " / ".join(f"{samples.count(which):,} {which}" for which in ("train", "valid", "test"))
        line = (
            f"data: {self.source}: {np.unique(samples.user_ids).size:,} users, {samples.num_samples:,} requests "
            f"({counts}), {int(samples.candidate_offsets[-1]):,} candidates, histories of "
            f"{samples.history_lengths.mean():.1f} events on average"
        )
        bayes = self.bayes_auc("test")
        return line + (f"; Bayes AUC of the planted model on test: {bayes:.4f}" if bayes is not None else "")

    def bayes_auc(self, which: str):
        """AUC of the planted probabilities of the first task that has them, or None."""
        samples = self.data.samples
        chosen = np.repeat(samples.split == {"train": 0, "valid": 1, "test": 2}[which], samples.num_candidates)
        for t in range(self.data.labels.shape[1]):
            oracle = self.data.oracle[chosen, t]
            if oracle.size and np.isfinite(oracle).all():
                return auc(oracle, self.data.labels[chosen, t])
        return None


def _read_samples(config) -> tuple[RankingSamples, str]:
    data, features = config.data, config.ranking.features
    source = resolve_ranking_source(data.source, data.path)
    if source == "synthetic":
        return generate_ranking(data.ranking.synthetic), "synthetic ranking"
    if source == "movielens":
        return read_movielens_ranking(data.path, num_candidates=data.ranking.num_candidates), f"movielens ranking {data.path}"
    history = {name: "id" for name in features.uih}
    history[features.uih_timestamp] = "int"
    if features.uih_action is not None:
        history[features.uih_action] = "int"
    if features.uih_watchtime is not None:
        history[features.uih_watchtime] = "float"
    candidates = {name: "id" for name in features.candidate}
    candidates[features.candidate_timestamp] = "int"
    for task in config.ranking.tasks:
        candidates[task.label] = "int" if task.type == "binary" else "float"
    columns = ImpressionColumns(
        user=data.ranking.user_column,
        contextual={name: "id" for name in features.contextual},
        history=history,
        candidates=candidates,
        candidate_timestamp=features.candidate_timestamp,
    )
    return read_impressions(data.path, columns, delimiter=data.ranking.sequence_delimiter), f"impressions {data.path}"


def build_dataset(config) -> RankingDataset:
    if config.model.uses_transducers:
        return _ultra().build_dataset(config)
    samples, source = _read_samples(config)
    ranking = config.ranking
    for which in ("train", "valid", "test"):
        if samples.count(which) == 0:
            raise ConfigError(
                f"the {source} data has no {which} requests: each user's latest request is test and the one "
                "before it valid, so users need at least 3 requests"
            )
    tasks = [TaskLabel(t.name, t.label, t.bitmask if t.type == "binary" else None) for t in ranking.tasks]
    raw_keyed = {name for name, table in config.embeddings.items() if table.keyed_by_raw_ids}
    data = index_samples(samples, features=ranking.features, tasks=tasks, raw_keyed_tables=raw_keyed, source=source)
    try:
        layout = SequenceLayout(data, max_seq_len=config.model.max_seq_len, use_history=ranking.use_history)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return RankingDataset(data, layout, source)


def build_stage(request: StageRequest) -> DLRMHSTUModel:
    """This stage of the model: the feature tables and the preprocessor on the first stage,
    the tower on the last, the stage's STU layers; each module drawn under its own key."""
    plan, dataset = request.plan, request.dataset
    config = plan.config
    if config.model.uses_transducers:
        return _ultra().build_stage(request)
    names = list(dict.fromkeys(t for group in config.ranking.features.embedded().values() for t in group.values()))
    tables = None
    if request.pre_process:
        tables = {
            name: build_table(
                name,
                config.embeddings[name],
                plan.model_config,
                num_embeddings=dataset.table_rows()[name],
                seed=plan.seed,
                device=plan.device,
                backend=plan.backend,
                shard_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
            )
            for name in names
        }
    return DLRMHSTUModel(
        plan.model_config,
        config.ranking,
        tables,
        table_dims={name: config.embeddings[name].dim for name in names},
        table_vocabularies={name: dataset.vocabulary(name) for name in names if config.embeddings[name].keyed_by_raw_ids},
        table_rows={
            name: config.embeddings[name].num_embeddings or rows
            for name, rows in dataset.table_rows().items()
            if config.embeddings[name].type == "plain"
        },
        pre_process=request.pre_process,
        post_process=request.post_process,
        backend=plan.backend,
        init_seed=plan.seed,
    )


@dataclass
class CheckpointTables(Dataset):
    """The tables a checkpoint implies, standing in for the data when a tool rebuilds the
    model from the checkpoint alone (``megatron-gr checkpoint reshard``): each plain
    table's rows are in the checkpoint's facts. A dynamic table is keyed by raw ids the
    checkpoint does not list; its stand-in vocabulary is one id, which only evaluation
    reads."""

    rows: dict[str, int]
    first_candidate_table: str

    @property
    def num_items(self) -> int:
        return self.rows[self.first_candidate_table] - 1

    def table_rows(self) -> dict[str, int]:
        return dict(self.rows)

    def vocabulary(self, table: str) -> torch.Tensor:
        return torch.ones(1, dtype=torch.int64)

    def describe(self) -> str:
        return f"tables {', '.join(f'{name}: {rows} rows' for name, rows in self.rows.items())} (from a checkpoint)"


def checkpoint_tables(config, facts: dict) -> CheckpointTables:
    """Plain tables' rows from the checkpoint's facts; a dynamic table gets two (ids 0, 1)."""
    saved = facts.get("table_rows", {})
    rows = {name: int(saved.get(name, 2)) for name in config.embeddings}
    features = config.ranking.features
    return CheckpointTables(rows, next(iter(features.candidate.values())))


def training_stream(plan, dataset: RankingDataset, dp_rank: int, dp_size: int) -> RankingTrainingBatches:
    if plan.config.model.uses_transducers:
        return _ultra().training_stream(plan, dataset, dp_rank, dp_size)
    return RankingTrainingBatches(
        dataset.data,
        dataset.layout,
        micro_batch_size=plan.config.training.micro_batch_size,
        num_micro_batches=plan.micro_batches_per_rank,
        seed=plan.seed,
        dp_rank=dp_rank,
        dp_size=dp_size,
        partition_fn=PARTITIONS[plan.micro_batch_balance],
    )


def evaluation_stream(plan, dataset: RankingDataset, which: str, dp_rank: int, dp_size: int) -> Iterator:
    if plan.config.model.uses_transducers:
        return _ultra().evaluation_stream(plan, dataset, which, dp_rank, dp_size)
    return ranking_evaluation_batches(
        dataset.data, dataset.layout, which, batch_size=plan.config.training.eval_batch_size, dp_rank=dp_rank, dp_size=dp_size
    )


def _ultra():
    """ULTRA-HSTU (channels, truncation, rematerialization): ``models/ultra/spec.py``."""
    from megatron_gr.models.ultra import spec as ultra_spec  # it builds on this module

    return ultra_spec


def candidate_loss(losses: torch.Tensor):
    """Sum of the per-candidate losses and their count: megatron divides gradients by the
    candidates of the whole global batch, whatever the layout."""
    total = losses.sum()
    # a fill on the device: torch.tensor(host value, device=cuda) waits for the copy
    count = torch.full((), losses.numel(), dtype=torch.int, device=losses.device)
    return total, count, {"loss_sum_and_tokens": torch.stack([total.detach().double(), count.double()])}


def candidate_statistics(output: CandidateScores):
    """The rows to gather: ``[scores | labels | oracle]`` per candidate, and its user."""
    oracle = output.oracle if output.oracle is not None else torch.full_like(output.scores, float("nan"), dtype=torch.float64)
    rows = torch.cat([output.scores.double(), output.labels.double(), oracle.double()], dim=1)
    zero = torch.zeros((), device=rows.device)
    count = torch.tensor(0, dtype=torch.int, device=rows.device)
    return zero, count, {"rows": rows, "user_ids": output.user_ids}


def reduce_candidate_statistics(outputs: list[dict], plan) -> dict[str, float]:
    """Gathers every rank's candidates (one contributor per data-parallel rank) and computes
    the metrics on all of them."""
    ranking = plan.config.ranking
    num_tasks = len(ranking.tasks)
    rows = torch.cat([out["rows"] for out in outputs]) if outputs else torch.zeros(0, 3 * num_tasks, dtype=torch.float64)
    users = torch.cat([out["user_ids"] for out in outputs]) if outputs else torch.zeros(0, dtype=torch.int64)
    rows = gather_rows(rows, plan.device).cpu().numpy()
    users = gather_rows(users.unsqueeze(1), plan.device).cpu().numpy()[:, 0]
    scores, labels, oracle = np.split(rows, 3, axis=1)
    return task_metrics(ranking.tasks, scores, labels, users, oracle, ranking.selection_task)


RANKING = register(
    TrainSpec(
        name="ranking",
        build_dataset=build_dataset,
        build_stage=build_stage,
        training_stream=training_stream,
        evaluation_batches=evaluation_stream,
        loss=candidate_loss,
        evaluation_statistics=candidate_statistics,
        reduce_statistics=reduce_candidate_statistics,
        selection_metric="auc",
        headline_metrics=("auc", "gauc", "bayes_auc"),
        evaluation_note="AUC/GAUC of the selection task (ranking.selection_task)",
        checkpoint_dataset=checkpoint_tables,
        serving_module=RankingServing,
    )
)
