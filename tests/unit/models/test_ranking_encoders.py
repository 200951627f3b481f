"""DLRM-HSTU's encoders, postprocessors, tower and loss against hand-computed values, and
the target-aware mask of a ranking sequence against a dense reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_gr.config.ranking_config import ActionEncoderConfig, ContentEncoderConfig, TaskConfig, TowerConfig
from megatron_gr.models.ranking.encoders import ActionEncoder, ContentEncoder, PositionTimeEncoder
from megatron_gr.models.ranking.tower import (
    LayerNormPostprocessor,
    MultiTaskTower,
    TimestampLayerNormPostprocessor,
    task_losses,
    task_scores,
)
from megatron_gr.ops.attention_mask import attention_mask


def test_action_encoder_sums_one_embedding_per_set_bit_and_reached_threshold():
    encoder = ActionEncoder(ActionEncoderConfig(action_weights=[1, 4], watchtime_thresholds=[5.0], dim=2), init_std=0.1)
    with torch.no_grad():
        encoder.embeddings.copy_(torch.tensor([[1.0, 0.0], [0.0, 10.0], [100.0, 100.0]]))  # bit 1, bit 4, watch >= 5
    actions = torch.tensor([0, 1, 5, 4, 2])  # bit 2 is not embedded
    watch = torch.tensor([0.0, 6.0, 1.0, 5.0, 0.0])
    expected = [[0, 0], [101, 100], [1, 10], [100, 110], [0, 0]]
    assert encoder(actions, watch).tolist() == expected
    assert encoder.candidate_embedding.shape == (2,)


def test_position_and_time_buckets():
    encoder = PositionTimeEncoder(num_position_buckets=4, num_time_buckets=8, time_bucket_fn="log", width=3, init_std=0.1)
    position, time = encoder.buckets(torch.tensor([0, 1, 3, 200]), torch.tensor([0, 1, 7, 1000]))
    assert position.tolist() == [0, 1, 3, 3]  # clipped to the last bucket
    assert time.tolist() == [0, 1, 3, 7]  # floor(log2(gap + 1)), clipped: log2(1001) = 9.97
    out = encoder(torch.tensor([2]), torch.tensor([3]))
    expected = encoder.position_embedding.weight[2] + encoder.time_embedding.weight[2]
    assert torch.equal(out[0], expected)


def test_content_encoders():
    history, candidates = torch.randn(5, 6), torch.randn(2, 6)
    slice_ = ContentEncoder(ContentEncoderConfig(), history_width=6, candidate_width=6)
    assert slice_(history, candidates)[0] is history and slice_.dim == 6
    mlp = ContentEncoder(ContentEncoderConfig(type="mlp", dim=4, mlp_hidden=8), history_width=6, candidate_width=9)
    h, c = mlp(history, torch.randn(2, 9))
    assert h.shape == (5, 4) and c.shape == (2, 4)
    layer = mlp.history_mlp
    expected = layer.fc2(F.silu(F.layer_norm(layer.fc1(history), (8,), layer.norm.weight, layer.norm.bias)))
    assert torch.allclose(h, expected)
    with pytest.raises(ValueError, match="equally wide, got 6 and 9"):
        ContentEncoder(ContentEncoderConfig(), history_width=6, candidate_width=9)


def test_timestamp_layernorm_appends_hour_of_day_and_day_of_week():
    post = TimestampLayerNormPostprocessor(3, 1e-5, period_units=[3600, 86400], units_per_period=[24, 7])
    stamp = 1_577_836_800 + 3 * 3600 + 59  # 2020-01-01 03:00:59 UTC; day 18262 since the epoch
    features = post.time_features(torch.tensor([stamp]))[0].double()
    hour, day = 2 * math.pi * 3 / 24, 2 * math.pi * (18262 % 7) / 7
    expected = torch.tensor([math.cos(hour), math.cos(day), math.sin(hour), math.sin(day)], dtype=torch.float64)
    assert torch.allclose(features, expected, atol=1e-6)
    hidden = torch.randn(1, 3)
    out = post(hidden, torch.tensor([stamp]))
    assert out.shape == (1, 7) and post.width == 7
    assert torch.allclose(out, F.layer_norm(torch.cat([hidden, features.float()[None]], dim=1), (7,), post.norm.weight, post.norm.bias, 1e-5))
    plain = LayerNormPostprocessor(3, 1e-5)
    assert torch.allclose(plain(hidden, None), F.layer_norm(hidden, (3,), eps=1e-5), atol=1e-6)


TASKS = [TaskConfig(name="click", label="a", bitmask=1, weight=2.0), TaskConfig(name="watch", type="regression", label="w", weight=0.5)]


def test_task_losses_are_weighted_per_candidate():
    outputs = torch.tensor([[0.3, 2.0], [-1.2, 0.5]])
    labels = torch.tensor([[1.0, 1.5], [0.0, 3.0]])
    bce = lambda z, y: -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))  # noqa: E731
    expected = [2.0 * bce(0.3, 1) + 0.5 * 0.5**2, 2.0 * bce(-1.2, 0) + 0.5 * 2.5**2]
    assert task_losses(outputs, labels, TASKS).tolist() == pytest.approx(expected, rel=1e-6)
    scores = task_scores(outputs, TASKS)
    assert scores[:, 0].tolist() == pytest.approx(torch.sigmoid(outputs[:, 0]).tolist()) and scores[:, 1].tolist() == [2.0, 0.5]


def test_tower_has_a_head_per_task_on_the_fusion_mlp():
    tower = MultiTaskTower(TowerConfig(hidden_sizes=[8, 4], layer_norm=True), TASKS, width=6, eps=1e-5)
    x = torch.randn(3, 6)
    out = tower(x)
    assert out.shape == (3, 2) and list(tower.heads) == ["click", "watch"]
    fused = tower.fusion(x)
    assert torch.allclose(out[:, 1:], tower.heads["watch"](fused))
    assert [type(m).__name__ for m in tower.fusion] == ["Linear", "SiLU", "LayerNorm", "Linear", "SiLU", "LayerNorm"]


def test_ranking_mask_equals_the_dense_rules():
    """[c c h h h k k]: contextual tokens see each other; history tokens the contextual ones
    and history causally; each candidate the contextual tokens, all history and itself."""
    c, h, k = "c", "h", "k"
    kinds = [c, c, h, h, h, k, k]
    expected = torch.zeros(7, 7, dtype=torch.bool)
    for i, qi in enumerate(kinds):
        for j, kj in enumerate(kinds):
            if kj == c:
                expected[i, j] = True
            elif kj == h:
                expected[i, j] = qi == k or (qi == h and j <= i)
            else:
                expected[i, j] = i == j
    mask = attention_mask(torch.tensor([7, 4]), 7, contextual_len=2, num_targets=torch.tensor([2, 1]))
    assert torch.equal(mask[0], expected)
    short = torch.zeros(7, 7, dtype=torch.bool)  # [c c h k]
    short[:4, :2] = True
    short[2, 2] = short[3, 2] = short[3, 3] = True
    assert torch.equal(mask[1], short)
