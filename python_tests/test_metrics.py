"""mmer_ext.metrics: values on hand-checked cases, condition slicing, input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmer_ext.data.protocols import CONDITION_LABELS
from mmer_ext.metrics import METRIC_NAMES, classification_metrics, condition_metrics, per_class_f1

# Imbalanced 3-class case, every metric different.
#   y_true = [0,0,0,0, 1,1, 2,2]      supports 4, 2, 2
#   y_pred = [0,0,0,0, 0,1, 2,1]
# Confusion (rows = true, cols = predicted):
#            p0 p1 p2
#   t0        4  0  0
#   t1        1  1  0
#   t2        0  1  1
#   column sums 5, 2, 1
# WA  = (4+1+1)/8 = 3/4
# recall    = 4/4, 1/2, 1/2             -> UA = 2/3
# precision = 4/5, 1/2, 1/1
# F1_c      = 2PR/(P+R) = 8/9, 1/2, 2/3 -> macro-F1 = (16+9+12)/18/3 = 37/54
# weighted-F1 = (4*8/9 + 2*1/2 + 2*2/3)/8 = (53/9)/8 = 53/72
Y_TRUE = [0, 0, 0, 0, 1, 1, 2, 2]
Y_PRED = [0, 0, 0, 0, 0, 1, 2, 1]
EXPECTED = {"WA": 3 / 4, "UA": 2 / 3, "F1": 37 / 54, "WF1": 53 / 72}


def test_hand_checked_values():
    m = classification_metrics(Y_TRUE, Y_PRED)
    assert set(m) == set(METRIC_NAMES)
    for k, v in EXPECTED.items():
        assert m[k] == pytest.approx(v, abs=1e-12), k
        assert isinstance(m[k], float)


def test_balanced_four_classes():
    # y_true = [0,0,1,1,2,2,3,3], y_pred = [0,1,1,1,2,0,3,2]
    # confusion: t0 -> p0,p1 ; t1 -> p1,p1 ; t2 -> p2,p0 ; t3 -> p3,p2
    # correct = 1+2+1+1 = 5 -> WA = 5/8; recalls 1/2, 1, 1/2, 1/2 -> UA = 5/8 (balanced: UA == WA)
    # predicted counts: p0 2 (1 right), p1 3 (2 right), p2 2 (1 right), p3 1 (1 right)
    # precision 1/2, 2/3, 1/2, 1 ; F1 = 1/2, 4/5, 1/2, 2/3 -> macro = (15+24+15+20)/30/4 = 74/120
    # weighted F1 = macro F1 here (equal supports)
    m = classification_metrics([0, 0, 1, 1, 2, 2, 3, 3], [0, 1, 1, 1, 2, 0, 3, 2])
    assert m["WA"] == pytest.approx(5 / 8)
    assert m["UA"] == pytest.approx(5 / 8)
    assert m["F1"] == pytest.approx(74 / 120)
    assert m["WF1"] == pytest.approx(74 / 120)
    np.testing.assert_allclose(
        per_class_f1([0, 0, 1, 1, 2, 2, 3, 3], [0, 1, 1, 1, 2, 0, 3, 2]), [1 / 2, 4 / 5, 1 / 2, 2 / 3]
    )


def test_torch_and_numpy_inputs_agree():
    ref = classification_metrics(Y_TRUE, Y_PRED)
    assert classification_metrics(np.array(Y_TRUE, dtype=np.int32), np.array(Y_PRED)) == ref
    assert classification_metrics(torch.tensor(Y_TRUE), torch.tensor(Y_PRED)) == ref
    # Labels stored as floats are fine when they are whole numbers.
    assert classification_metrics(torch.tensor(Y_TRUE, dtype=torch.float32), Y_PRED) == ref


def test_num_classes_counts_absent_classes_as_zero():
    # Perfect predictions on classes 0 and 1; class 2 never occurs. Without num_classes the average runs over
    # {0, 1}: all 1. With num_classes=3 class 2's recall and F1 are undefined -> 0, so UA = F1 = 2/3; weighted-F1
    # gives class 2 weight 0 (support 0) and stays 1.
    assert classification_metrics([0, 0, 1, 1], [0, 0, 1, 1]) == {"WA": 1.0, "UA": 1.0, "F1": 1.0, "WF1": 1.0}
    m = classification_metrics([0, 0, 1, 1], [0, 0, 1, 1], num_classes=3)
    assert m["WA"] == 1.0 and m["WF1"] == 1.0
    assert m["UA"] == pytest.approx(2 / 3) and m["F1"] == pytest.approx(2 / 3)
    assert per_class_f1([0, 0, 1, 1], [0, 0, 1, 1], num_classes=3).tolist() == [1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "y_true, y_pred, kwargs, match",
    [
        ([0, 1, 2], [0, 1], {}, "length"),
        ([], [], {}, "empty"),
        ([[0.1, 0.9], [0.8, 0.2]], [1, 0], {}, "1-D"),
        ([0, 1], [0.5, 1.0], {}, "integer"),
        ([0, 1, 3], [0, 1, 1], {"num_classes": 3}, "outside"),
        ([0, -1], [0, 1], {}, "non-negative"),
        (3, 3, {}, "scalar"),
    ],
)
def test_classification_metrics_rejects_bad_input(y_true, y_pred, kwargs, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(y_true, y_pred, **kwargs)


def _six_conditions_case():
    """4 utterances with labels [0,1,0,1], each under the 6 missing conditions plus full.

    Under condition c the first k[c] items are predicted right, the others get the other class:
    k = 4,3,2,1,0,2 (conditions 0..5) and 4 (full).  Per condition WA = k/4 = 1, .75, .5, .25, 0, .5
    (and UA equals WA on these balanced slices: e.g. k=3 -> recalls 2/2, 1/2 -> .75; k=1 -> 1/2, 0/2 -> .25).
    average over the six = 3/6 = 0.5; pooled over all 28 items: (4+3+2+1+0+2+4)/28 = 16/28 = 4/7.
    """
    labels = np.array([0, 1, 0, 1])
    k = [4, 3, 2, 1, 0, 2, 4]
    y_true, y_pred, cond = [], [], []
    for c, kc in enumerate(k):
        pred = labels.copy()
        pred[kc:] = 1 - pred[kc:]
        y_true.append(labels)
        y_pred.append(pred)
        cond.append(np.full(4, c))
    y_true, y_pred, cond = map(np.concatenate, (y_true, y_pred, cond))
    perm = np.random.default_rng(0).permutation(len(y_true))  # slicing must follow `condition`, not positions
    return y_true[perm], y_pred[perm], cond[perm]


def test_condition_metrics_split_average_overall():
    y_true, y_pred, cond = _six_conditions_case()
    out = condition_metrics(y_true, y_pred, cond)
    assert list(out) == list(CONDITION_LABELS) + ["average", "overall"]
    expected_wa = [1.0, 0.75, 0.5, 0.25, 0.0, 0.5, 1.0]
    for label, wa in zip(CONDITION_LABELS, expected_wa):
        assert out[label]["WA"] == pytest.approx(wa), label
        assert out[label]["UA"] == pytest.approx(wa), label
    assert out["average"]["WA"] == pytest.approx(0.5)
    assert out["average"]["UA"] == pytest.approx(0.5)
    for key in METRIC_NAMES:  # average = mean of the six missing conditions only (full excluded)
        assert out["average"][key] == pytest.approx(np.mean([out[lab][key] for lab in CONDITION_LABELS[:6]]))
    assert out["overall"]["WA"] == pytest.approx(4 / 7)
    assert out["overall"] == classification_metrics(y_true, y_pred)


def test_condition_metrics_without_all_six_has_no_average():
    y_true, y_pred, cond = _six_conditions_case()
    keep = np.isin(cond, [0, 2, 6])
    y_true, y_pred, cond = (torch.from_numpy(x[keep]) for x in (y_true, y_pred, cond))
    out = condition_metrics(y_true, y_pred, cond)
    assert list(out) == ["{a}", "{l}", "{a,v,l}", "overall"]
    assert out["{l}"]["WA"] == pytest.approx(0.5)
    assert out["overall"]["WA"] == pytest.approx((4 + 2 + 4) / 12)


def test_condition_metrics_num_classes_applies_to_every_slice():
    # Slice {a} has only class 0 (perfect); with num_classes=2 class 1 counts as recall 0 -> UA 1/2.
    out = condition_metrics([0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], num_classes=2)
    assert out["{a}"]["UA"] == pytest.approx(0.5)
    assert out["{v}"]["UA"] == pytest.approx(0.5)
    assert out["overall"]["UA"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "cond, match",
    [([0, 1, 7], "0..6"), ([0, -1, 2], "0..6"), ([0, 1], "length"), ([0.0, 1.5, 2.0], "integer")],
)
def test_condition_metrics_rejects_bad_conditions(cond, match):
    with pytest.raises(ValueError, match=match):
        condition_metrics([0, 1, 0], [0, 1, 1], cond)


def test_condition_metrics_rejects_empty_and_mismatch():
    with pytest.raises(ValueError, match="empty"):
        condition_metrics([], [], [])
    with pytest.raises(ValueError, match="length"):
        condition_metrics([0, 1], [0], [0, 1])


def test_confusion_matrices_by_hand():
    """Worked by hand: 3 classes, two conditions ({a} = 0, {a,v,l} = 6)."""
    from mmer_ext.metrics import condition_confusions, confusion_counts
    from mmer_ext.report import normalise_confusion

    y_true = [0, 0, 1, 2, 2, 2, 0, 1]
    y_pred = [0, 1, 1, 2, 0, 2, 0, 0]
    cond = [0, 0, 0, 0, 6, 6, 6, 6]
    # {a}: (0->0), (0->1), (1->1), (2->2)
    # {a,v,l}: (2->0), (2->2), (0->0), (1->0)
    per = condition_confusions(y_true, y_pred, cond, num_classes=3)
    assert list(per) == ["{a}", "{a,v,l}", "overall"]
    assert per["{a}"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert per["{a,v,l}"] == [[1, 0, 0], [1, 0, 0], [1, 0, 1]]
    assert per["overall"] == [[2, 1, 0], [1, 1, 0], [1, 0, 2]]
    # A class that never occurs still gets its row and column.
    assert confusion_counts([0, 0], [0, 0], num_classes=3).tolist() == [[2, 0, 0], [0, 0, 0], [0, 0, 0]]
    norm = normalise_confusion(per["{a}"])
    assert norm[0].tolist() == [0.5, 0.5, 0.0] and norm[2].tolist() == [0.0, 0.0, 1.0]
    empty = normalise_confusion([[2, 0], [0, 0]])
    assert empty[0].tolist() == [1.0, 0.0] and np.isnan(empty[1]).all()
    with pytest.raises(ValueError, match="y_pred"):
        confusion_counts([0, 1], [0, 3], num_classes=3)
    with pytest.raises(ValueError, match="square"):
        normalise_confusion([[1, 2, 3]])


def test_paired_test_over_seeds():
    """ttest_rel by hand: differences d = (1, 2, 3): mean 2, sd 1, t = 2 / (1 / sqrt 3) = 3.4641, df 2."""
    from scipy import stats

    from mmer_ext.significance import markdown_orderings, paired_test, pairwise_orderings

    r = paired_test([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert r["mean_diff"] == pytest.approx(2.0) and r["std_diff"] == pytest.approx(1.0)
    assert r["t"] == pytest.approx(2 * 3 ** 0.5)
    assert r["p"] == pytest.approx(2 * stats.t.sf(2 * 3 ** 0.5, df=2))  # 0.0742: not significant with 3 seeds
    assert paired_test([1.0, 2.0], [1.0, 2.0])["p"] == 1.0
    assert paired_test([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])["p"] == 0.0  # the same gain under every seed
    with pytest.raises(ValueError, match="at least 2"):
        paired_test([1.0], [2.0])
    with pytest.raises(ValueError, match="same length"):
        paired_test([1.0, 2.0], [1.0])
    # A 0.02-point gap in the means with seed-to-seed noise of several points is not an ordering.
    orderings = pairwise_orderings({"A": [0.50, 0.56, 0.53], "B": [0.55, 0.49, 0.5498], "C": [0.70, 0.72, 0.71]})
    assert [(o["better"], o["worse"]) for o in orderings] == [("C", "A"), ("C", "B"), ("A", "B")]
    by_pair = {(o["better"], o["worse"]): o for o in orderings}
    assert not by_pair[("A", "B")]["significant"] and by_pair[("C", "A")]["significant"]
    table = markdown_orderings(orderings)
    assert "| A > B |" in table and "not significant" in table and "**significant**" in table
