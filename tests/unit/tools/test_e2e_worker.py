"""tools/benchmarks/e2e_worker.py: a measured run is long enough for the config's LR warm-up
(ML-100K's 50 warm-up steps in a 33-step run were refused at plan time), no longer."""

from __future__ import annotations


import pytest

from megatron_gr.config import ConfigError, resolve_config
from tests.conftest import REPO_ROOT
from tests.unit.tools.benchmark_tools import load_benchmark

worker = load_benchmark("e2e_worker")

ML100K = str(REPO_ROOT / "configs" / "hstu_ml100k.yaml")
DATA = (["data", "path"], "ml-100k")  # read when training starts, not here


def test_a_run_shorter_than_the_warm_up_gets_the_warm_up_length():
    probe = resolve_config(ML100K, [DATA, (["training", "train_iters"], 2**31)])
    assert probe.training.lr_warmup_iters == 50
    with pytest.raises(ConfigError, match="lr_warmup_iters=50 must be smaller than the decay length 33"):
        resolve_config(ML100K, [DATA, (["training", "train_iters"], 33)])  # what the worker asked before
    length = worker.run_length(probe, 33)
    assert length == 51
    assert resolve_config(ML100K, [DATA, (["training", "train_iters"], length)]).training.train_iters == 51


@pytest.mark.parametrize("sets, total, expected", [
    ([(["training", "lr_warmup_iters"], 0)], 33, 33),  # no warm-up: the steps taken
    ([(["training", "lr_warmup_iters"], 10)], 33, 33),  # a warm-up that fits
    ([(["training", "lr_warmup_iters"], 0)], 1, 2),  # at least two steps
    ([(["training", "lr_decay_iters"], 60)], 33, 33),  # the decay length does not depend on train_iters
])
def test_other_runs_take_the_steps_they_measure(sets, total, expected):
    probe = resolve_config(ML100K, [DATA, (["training", "train_iters"], 2**31), *sets])
    assert worker.run_length(probe, total) == expected
