"""The golden-value suite (tests/functional/golden.py): every CPU case trains and evaluates
to its stored golden values within the written tolerance policy; the resumed case also
reproduces the uninterrupted one. Single-rank cases run in this process; the 4-rank cases
share one torchrun launch. GPU cases run where CUDA is.

A failure lists every value that moved. After an intended change of the numerics:
``python tools/make_golden.py --all`` (and on the GPU machine for the GPU cases)."""

from __future__ import annotations

import pytest

from tests.functional.golden import CASES, CONFIGS, GOLDEN, PENDING, case, differences, read_golden, run_all, tolerance_for

pytestmark = pytest.mark.slow

CPU_SINGLE = [c.name for c in CASES if not c.gpu and c.ranks == 1]
CPU_MULTI = [c.name for c in CASES if not c.gpu and c.ranks > 1]
GPU = [c.name for c in CASES if c.gpu]


def _check(name: str, record: dict) -> None:
    entry = case(name)
    problems = differences(record, read_golden(name), tolerance_for(entry))
    assert not problems, f"{name} departs from its golden values:\n" + "\n".join(problems)
    if entry.same_as:
        same = differences(record, read_golden(entry.same_as), tolerance_for(entry))
        assert not same, f"{name} does not reproduce {entry.same_as}:\n" + "\n".join(same)


@pytest.fixture(scope="module")
def single_rank_records(tmp_path_factory):
    return run_all(CPU_SINGLE, tmp_path_factory.mktemp("golden_single"))


@pytest.fixture(scope="module")
def multi_rank_records(tmp_path_factory):
    return run_all(CPU_MULTI, tmp_path_factory.mktemp("golden_multi"))


@pytest.mark.parametrize("name", CPU_SINGLE)
def test_single_rank_case(single_rank_records, name):
    _check(name, single_rank_records[name])


@pytest.mark.parametrize("name", CPU_MULTI)
def test_multi_rank_case(multi_rank_records, name):
    _check(name, multi_rank_records[name])


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU)
def test_gpu_case(tmp_path, name):
    _check(name, run_all([name], tmp_path)[name])


def test_every_case_has_a_config_and_golden_values_and_nothing_else_does():
    configs = {p.stem for p in CONFIGS.glob("*.yaml")}
    goldens = {p.stem for p in GOLDEN.glob("*.json")}
    trained = {c.same_as if c.resume_at else c.name for c in CASES}
    assert trained == configs, "every config belongs to a case"
    assert {c.name for c in CASES if not c.gpu} <= goldens, "run tools/make_golden.py --all"
    assert goldens <= {c.name for c in CASES}, "golden files without a case"
    assert not set(PENDING) & {c.name for c in CASES}
