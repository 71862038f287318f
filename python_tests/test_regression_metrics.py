"""Sentiment regression metrics (MMSA MetricsTop semantics, as IMDer ships it) and recovery metrics, on hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmer_ext.metrics import (
    RECOVERY_METRIC_NAMES,
    REGRESSION_METRIC_NAMES,
    recovery_metrics,
    regression_metrics,
)


def test_hand_worked_case():
    y = [1.0, -1.0, 0.0, 2.5]
    p = [0.5, 0.2, -0.1, 2.4]
    r = regression_metrics(y, p)
    assert tuple(r) == REGRESSION_METRIC_NAMES
    # has0: y >= 0 -> [T, F, T, T]; p >= 0 -> [T, T, F, T]: 2 of 4 right.
    assert r["Acc2_has0"] == pytest.approx(0.5)
    # Weighted F1: class T (support 3) P = R = 2/3 -> F1 2/3; class F (support 1) F1 0 -> (3 * 2/3 + 0) / 4 = 0.5.
    assert r["F1_has0"] == pytest.approx(0.5)
    # non0: the sample with y = 0 is dropped: y > 0 -> [T, F, T], p > 0 -> [T, T, T]: 2 of 3.
    assert r["Acc2_non0"] == pytest.approx(2 / 3)
    # class T (support 2): P 2/3, R 1 -> F1 0.8; class F (support 1): F1 0 -> 2 * 0.8 / 3.
    assert r["F1_non0"] == pytest.approx(1.6 / 3)
    # Acc7: round(p) = [0, 0, -0, 2] (0.5 -> 0, half to even), round(y) = [1, -1, 0, 2] (2.5 -> 2): 2 of 4.
    assert r["Acc7"] == pytest.approx(0.5)
    # Acc5: p clipped to +-2 = [0.5, 0.2, -0.1, 2] -> [0, 0, 0, 2]; y -> [1, -1, 0, 2]: 2 of 4.
    assert r["Acc5"] == pytest.approx(0.5)
    assert r["MAE"] == pytest.approx((0.5 + 1.2 + 0.1 + 0.1) / 4)
    yy, pp = np.array(y), np.array(p)
    dy, dp = yy - yy.mean(), pp - pp.mean()
    assert r["Corr"] == pytest.approx(float((dy * dp).sum() / math.sqrt((dy ** 2).sum() * (dp ** 2).sum())))
    assert all(isinstance(v, float) for v in r.values())


def test_zero_labels_has0_vs_non0():
    y = [0.0, 0.0, 1.0, -1.0]
    p = [-0.1, 0.0, 0.5, -0.5]
    r = regression_metrics(y, p)
    # has0 counts y = 0 as positive and p = 0 as positive: [T,T,T,F] vs [F,T,T,F].
    assert r["Acc2_has0"] == pytest.approx(0.75)
    # non0 only looks at the two nonzero labels, both right.
    assert r["Acc2_non0"] == 1.0 and r["F1_non0"] == 1.0


def test_clipping_and_rounding():
    # Half to even (np.round): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -2.5 -> -2.
    r = regression_metrics([0.5, 1.5, 2.5, -2.5], [0.0, 2.0, 2.0, -2.0])
    assert r["Acc7"] == 1.0 and r["Acc5"] == 1.0
    # Clipping: p = 10 counts as 3 for Acc7 and as 2 for Acc5; y = -2.4 with p = -3 is right only for Acc5.
    r = regression_metrics([3.0, -2.4], [10.0, -3.0])
    assert r["Acc7"] == 0.5 and r["Acc5"] == 1.0
    assert r["MAE"] == pytest.approx((7.0 + 0.6) / 2)


def test_degenerate_cases():
    r = regression_metrics([1.0, -2.0, 0.4], [0.3, 0.3, 0.3])
    assert r["Corr"] == 0.0  # constant predictions: documented 0, not nan
    assert regression_metrics([1.0, 1.0], [0.5, -2.0])["Corr"] == 0.0
    r = regression_metrics([0.0, 0.0], [0.3, -0.3])
    assert math.isnan(r["Acc2_non0"]) and math.isnan(r["F1_non0"])
    assert r["Acc2_has0"] == 0.5
    r = regression_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert r["MAE"] == 0.0 and r["Corr"] == pytest.approx(1.0) and r["Acc7"] == 1.0 and r["F1_non0"] == 1.0


def test_inputs_and_errors():
    y = torch.tensor([[1.0], [-1.0], [0.5]])
    p = torch.tensor([0.8, -0.2, -0.1], dtype=torch.bfloat16)
    r = regression_metrics(y, p)
    assert r["Acc2_non0"] == pytest.approx(2 / 3)
    assert regression_metrics(np.array([1, -1]), [1, -1])["Acc2_has0"] == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        regression_metrics([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="empty"):
        regression_metrics([], [])
    with pytest.raises(ValueError, match="non-finite"):
        regression_metrics([1.0, float("nan")], [0.0, 0.0])
    with pytest.raises(ValueError, match="shape \\[N\\] or \\[N, 1\\]"):
        regression_metrics(np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="numeric"):
        regression_metrics(["a"], ["b"])


def test_recovery_metrics_hand_worked():
    r = recovery_metrics([[3.0, 4.0]], [[4.0, 3.0]])
    assert tuple(r) == RECOVERY_METRIC_NAMES
    assert r["MSE"] == pytest.approx(1.0) and r["cosine"] == pytest.approx(24 / 25)
    # Per-sample cosines 1 and -1 average to 0; MSE over all four elements.
    r = recovery_metrics(np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[1.0, 0.0], [0.0, -1.0]]))
    assert r["MSE"] == pytest.approx(9 / 4) and r["cosine"] == pytest.approx(0.0)
    # Features [B, C, L] are flattened per sample; a zero vector counts as cosine 0.
    rec = torch.zeros(2, 2, 3)
    tgt = torch.ones(2, 2, 3)
    rec[0] = 2.0
    r = recovery_metrics(rec, tgt)
    assert r["cosine"] == pytest.approx(0.5) and r["MSE"] == pytest.approx((6 * 1.0 + 6 * 1.0) / 12)
    x = torch.randn(4, 32, 48, dtype=torch.float16)
    r = recovery_metrics(x, x)
    assert r["MSE"] == 0.0 and r["cosine"] == pytest.approx(1.0)


def test_recovery_metrics_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        recovery_metrics(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="B >= 1"):
        recovery_metrics(np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        recovery_metrics(np.array([[np.inf]]), np.array([[1.0]]))
