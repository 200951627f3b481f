"""Model families are registered TrainSpecs; the item-id space is the data's."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_gr.config import ExperimentConfig
from megatron_gr.data.item_space import ItemSpace
from megatron_gr.models.registry import get_train_spec, registered_types


def test_retrieval_is_registered_and_unknown_types_are_named():
    assert "retrieval" in registered_types()
    spec = get_train_spec("retrieval")
    assert spec.selection_metric == "ndcg@10"
    with pytest.raises(ValueError, match=r"no model type 'nope'; registered: .*retrieval"):
        get_train_spec("nope")


def test_item_space_gives_the_ids_the_table_is_keyed_by():
    vocab = np.array([-1, 2**40, 7, 123], dtype=np.int64)
    dense = np.array([[1, 3], [2, 2]])
    assert ItemSpace(vocab, raw_keys=False).table_ids(dense).tolist() == [[1, 3], [2, 2]]
    assert ItemSpace(vocab, raw_keys=True).table_ids(dense).tolist() == [[2**40, 123], [7, 7]]
    assert ItemSpace(vocab, raw_keys=True).corpus().tolist() == [2**40, 7, 123]
    assert ItemSpace(vocab, raw_keys=False).corpus().tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="at least one item"):
        ItemSpace(np.array([-1]), raw_keys=False)


def test_retrieval_dataset_describes_what_the_run_trains_on():
    config = ExperimentConfig.from_dict({"data": {"synthetic": {"num_users": 50, "num_items": 40}},
                                         "embeddings": {"item": {"type": "dynamic"}}})
    dataset = get_train_spec("retrieval").build_dataset(config)
    assert dataset.items.raw_keys and dataset.num_items == dataset.split.sequences.num_items
    line = dataset.describe()
    assert line.startswith("data: synthetic: 50 users, ") and "events" in line and "\n" not in line
