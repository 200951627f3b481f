"""The training recipe of HSTU retrieval (``model.type: retrieval``): next-item prediction
on leave-one-out splits, a sampled-softmax loss per token, full-corpus HR/NDCG/MRR."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_gr.data import LeaveOneOutSplit
from megatron_gr.data.item_space import ItemSpace
from megatron_gr.data.leave_one_out_data import load_training_data
from megatron_gr.data.loader import PARTITIONS, TrainingBatches, evaluation_batches
from megatron_gr.data.summary import DataReport
from megatron_gr.embeddings.builder import build_table
from megatron_gr.models.hstu_retrieval import HSTURetrievalModel
from megatron_gr.models.registry import Dataset, StageRequest, TrainSpec, register
from megatron_gr.models.retrieval_serving import RetrievalServing
from megatron_gr.models.retrieval_metrics import NAMES, metric_sums, metrics_from_sums


@dataclass
class RetrievalDataset(Dataset):
    split: LeaveOneOutSplit
    items: ItemSpace
    report: DataReport

    @property
    def num_items(self) -> int:
        return self.items.num_items

    @property
    def num_users(self) -> int:
        return self.split.sequences.num_users

    def describe(self) -> str:
        return self.report.line()


def build_dataset(config) -> RetrievalDataset:
    data = load_training_data(config.data)
    items = ItemSpace(vocab=data.split.sequences.item_vocab, raw_keys=config.embeddings["item"].keyed_by_raw_ids)
    return RetrievalDataset(data.split, items, data.report)


@dataclass
class CheckpointItems(Dataset):
    """The item space a checkpoint implies, standing in for the data when a tool rebuilds
    the model from the checkpoint alone: a plain table's dense ids 1..num_items (its row
    count is in the checkpoint's facts). A dynamic table is keyed by raw ids the checkpoint
    does not list; the stand-in corpus is then one id, which only sampling and evaluation
    read."""

    items: ItemSpace

    @property
    def num_items(self) -> int:
        return self.items.num_items

    def describe(self) -> str:
        return f"{self.num_items} items (from a checkpoint)"


def checkpoint_items(config, facts: dict) -> CheckpointItems:
    item = config.embeddings["item"]
    num_items = int(facts.get("num_items", 1)) if item.type == "plain" else 1
    return CheckpointItems(ItemSpace(vocab=np.arange(num_items + 1, dtype=np.int64), raw_keys=item.keyed_by_raw_ids))


def build_stage(request: StageRequest) -> HSTURetrievalModel:
    """This stage of the model: the item table on the first and the last stage (inputs;
    loss and ranking), the stage's STU layers, each module drawn under its own key."""
    plan, dataset = request.plan, request.dataset
    table = None
    if request.pre_process or request.post_process:
        table = build_table(
            "item",
            plan.config.embeddings["item"],
            plan.model_config,
            num_embeddings=dataset.num_items + 1,
            seed=plan.seed,
            device=plan.device,
            backend=plan.backend,
            # Sharded over the data- and context-parallel ranks (each looks up its own tokens);
            # tensor-parallel ranks keep identical copies.
            shard_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
        )
    return HSTURetrievalModel(
        plan.model_config,
        table,
        dataset.num_items,
        corpus_ids=dataset.items.corpus(),
        pre_process=request.pre_process,
        post_process=request.post_process,
        backend=plan.backend,
        init_seed=plan.seed,
    )


def training_stream(plan, dataset: RetrievalDataset, dp_rank: int, dp_size: int) -> TrainingBatches:
    training = plan.config.training
    return TrainingBatches(
        dataset.split,
        dataset.items,
        max_seq_len=plan.model_config.max_seq_len,
        micro_batch_size=training.micro_batch_size,
        num_micro_batches=plan.micro_batches_per_rank,
        seed=plan.seed,
        dp_rank=dp_rank,
        dp_size=dp_size,
        partition_fn=PARTITIONS[plan.micro_batch_balance],
        windows=plan.config.data.train_windows,
        num_negatives=plan.model_config.num_negatives,
        num_in_batch_negatives=plan.model_config.num_in_batch_negatives,
    )


def evaluation_stream(plan, dataset: RetrievalDataset, which: str, dp_rank: int, dp_size: int) -> Iterator:
    return evaluation_batches(
        dataset.split,
        dataset.items,
        which,
        max_seq_len=plan.model_config.max_seq_len,
        batch_size=plan.config.training.eval_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )


def token_loss(losses: torch.Tensor):
    """Sum of per-token losses and their count: megatron divides gradients by the tokens of
    the whole global batch (``calculate_per_token_loss``)."""
    total = losses.sum()
    # a fill on the device: torch.tensor(host value, device=cuda) waits for the copy
    count = torch.full((), losses.numel(), dtype=torch.int, device=losses.device)
    return total, count, {"loss_sum_and_tokens": torch.stack([total.detach().double(), count.double()])}


def rank_statistics(ranks: torch.Tensor):
    zero = torch.zeros((), device=ranks.device)
    count = torch.tensor(0, dtype=torch.int, device=ranks.device)
    return zero, count, {"metric_sums": metric_sums(ranks)}


def reduce_rank_statistics(outputs: list[dict], plan) -> dict[str, float]:
    """One contributor per data-parallel rank: a sum over all ranks gives every rank the
    global numbers."""
    sums = torch.zeros(1 + len(NAMES), dtype=torch.float64, device=plan.device)
    for out in outputs:
        sums += out["metric_sums"]
    dist.all_reduce(sums)
    return metrics_from_sums(sums)


RETRIEVAL = register(
    TrainSpec(
        name="retrieval",
        build_dataset=build_dataset,
        build_stage=build_stage,
        training_stream=training_stream,
        evaluation_batches=evaluation_stream,
        loss=token_loss,
        evaluation_statistics=rank_statistics,
        reduce_statistics=reduce_rank_statistics,
        selection_metric="ndcg@10",
        headline_metrics=("hr@10", "ndcg@10"),
        evaluation_note="full-corpus ranking, seen items not removed",
        checkpoint_dataset=checkpoint_items,
        serving_module=RetrievalServing,
    )
)
