"""The gradient norm the step decided on the device uses: on two gloo ranks, every rank
issues megatron's all-reduces (a rank without gradients with a zero), so the collectives
that follow meet, and the norm is the one over both ranks' gradients."""

from __future__ import annotations

import json

import pytest

from tests.support.multirank import run_ranks

pytestmark = pytest.mark.slow


def test_two_ranks_issue_the_same_norm_collectives(tmp_path):
    run_ranks(2, "tests.unit.compat.device_norm_worker:norms", str(tmp_path), workdir=tmp_path)
    reports = [json.loads((tmp_path / f"norms{rank}.json").read_text()) for rank in (0, 1)]
    assert reports[0] == reports[1]
    # squares: shared 4 + 4 (rank 0) + 4 (rank 1 first part); per part 4 + 4 and 4; single 4
    assert reports[0] == pytest.approx({"shared_one_empty": 12**0.5, "per_part": 12**0.5, "single": 2.0})
