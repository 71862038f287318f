"""Classification metrics of the MMIN family, overall and per missing-modality condition.

Every number here comes from scikit-learn, on purpose: the papers we compare against (MMIN, IF-MMIN, NMER, MMGCN)
report numbers computed with ``sklearn.metrics``, so calling the same functions is the only way to be sure that a
difference in a table is a difference in the model and not in the arithmetic. This module only converts inputs,
validates them, and slices them by condition.

Definitions (as the authors' evaluation code computes them):

- ``WA`` (weighted accuracy) = ``accuracy_score``: the fraction of items classified correctly.
- ``UA`` (unweighted accuracy, UAR) = ``recall_score(average="macro")``: the mean of the per-class recalls, so every
  class counts the same whatever its size.
- ``F1`` = ``f1_score(average="macro")`` (MMIN's logs).
- ``WF1`` = ``f1_score(average="weighted")`` (MMGCN / ERC papers).

All four are fractions in [0, 1]; the report module turns them into percentages.

Sentiment regression (MOSI / MOSEI, IMDer): :func:`regression_metrics` follows MMSA's ``MetricsTop`` exactly (as IMDer ships it, github.com/mdswyz/IMDer;
section 3), again through ``sklearn.metrics`` for the binary scores:

- ``Acc2_has0`` / ``F1_has0``: ``pred >= 0`` vs ``y >= 0`` over all samples (accuracy, weighted F1).
- ``Acc2_non0`` / ``F1_non0``: ``pred > 0`` vs ``y > 0`` over the samples with ``y != 0`` (the numbers IMDer reports).
- ``Acc7`` / ``Acc5``: ``mean(round(clip(pred, -c, c)) == round(clip(y, -c, c)))`` with ``c = 3`` / ``2`` and
  ``np.round`` (half to even: 0.5 -> 0, 1.5 -> 2), as MMSA.
- ``MAE`` = ``mean(|pred - y|)``; ``Corr`` = Pearson correlation (``np.corrcoef``).

Accuracies and F1s are fractions in [0, 1] (the papers print them x100). :func:`recovery_metrics` scores recovered
features against the true ones (MSE and mean per-sample cosine).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

from mmer_ext.data.protocols import CONDITION_LABELS, FULL_CONDITION

__all__ = [
    "METRIC_NAMES",
    "NUM_MISSING_CONDITIONS",
    "RECOVERY_METRIC_NAMES",
    "REGRESSION_METRIC_NAMES",
    "classification_metrics",
    "condition_confusions",
    "condition_metrics",
    "confusion_counts",
    "per_class_f1",
    "recovery_metrics",
    "regression_metrics",
]

#: Keys of the dict returned by :func:`classification_metrics`, in the order the report prints them.
METRIC_NAMES: tuple[str, ...] = ("WA", "UA", "F1", "WF1")

#: Keys of :func:`regression_metrics`, in print order.
REGRESSION_METRIC_NAMES: tuple[str, ...] = ("Acc2_has0", "F1_has0", "Acc2_non0", "F1_non0", "Acc7", "Acc5", "MAE",
                                            "Corr")
#: Keys of :func:`recovery_metrics`.
RECOVERY_METRIC_NAMES: tuple[str, ...] = ("MSE", "cosine")

#: Conditions ``0 .. NUM_MISSING_CONDITIONS - 1`` are the six missing-modality conditions; ``FULL_CONDITION`` (6)
#: is the full-modality one.
NUM_MISSING_CONDITIONS: int = 6


def _as_label_array(x: Any, name: str) -> np.ndarray:
    """Turn ``x`` (numpy array, torch tensor, list) into a 1-D int64 numpy array of class ids.

    Float inputs are accepted only when every value is a whole number (labels saved as float32 happen); anything
    else, in particular 2-D logits, is refused with a message saying what to pass instead, because silently
    flattening ``[B, C]`` logits would give metrics of nonsense.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim == 0:
        raise ValueError(f"{name} must be a 1-D sequence of class ids, got a scalar")
    if arr.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D (one class id per item), got shape {tuple(arr.shape)}; "
            "for logits pass logits.argmax(-1)"
        )
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold integer class ids, got non-integer floats")
        return arr.astype(np.int64)
    raise ValueError(f"{name} must hold integer class ids, got dtype {arr.dtype}")


def _check_pair(y_true: Any, y_pred: Any, num_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (y_true, y_pred) pair: same length, non-empty, ids in ``[0, num_classes)`` when that is given."""
    yt = _as_label_array(y_true, "y_true")
    yp = _as_label_array(y_pred, "y_pred")
    if yt.shape[0] != yp.shape[0]:
        raise ValueError(f"y_true and y_pred differ in length: {yt.shape[0]} vs {yp.shape[0]}")
    if yt.shape[0] == 0:
        raise ValueError("cannot compute metrics of an empty set of predictions")
    if num_classes is not None:
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        for name, arr in (("y_true", yt), ("y_pred", yp)):
            if arr.min() < 0 or arr.max() >= num_classes:
                raise ValueError(
                    f"{name} holds class ids outside [0, {num_classes}): min {arr.min()}, max {arr.max()}"
                )
    elif min(yt.min(), yp.min()) < 0:
        raise ValueError("class ids must be non-negative")
    return yt, yp


def _labels(num_classes: int | None) -> list[int] | None:
    return None if num_classes is None else list(range(int(num_classes)))


def classification_metrics(y_true: Any, y_pred: Any, num_classes: int | None = None) -> dict[str, float]:
    """WA, UA, macro-F1 and weighted-F1 of one set of predictions.

    Parameters
    ----------
    y_true, y_pred : array-like of int, shape [N]
        Reference and predicted class ids (numpy arrays, torch tensors on any device, or lists).
    num_classes : int, optional
        When given, the macro averages run over all ``range(num_classes)`` classes, and ids outside it are an
        error. This matters on small slices (one condition, one fold) where a class may never occur: without it
        sklearn averages over the classes seen in ``y_true`` or ``y_pred`` only (what the authors' code does).
        A class absent from ``y_true`` has an undefined recall/F1, counted as 0 (``zero_division=0``), so passing
        ``num_classes`` on a slice lacking a class lowers UA/F1 -- that is the point: it is the conservative choice.

    Returns
    -------
    dict
        ``{"WA", "UA", "F1", "WF1"}`` as Python floats in [0, 1].

    Raises
    ------
    ValueError
        On empty input, a length mismatch, non-integer or 2-D inputs, or ids outside ``[0, num_classes)``.
    """
    yt, yp = _check_pair(y_true, y_pred, num_classes)
    labels = _labels(num_classes)
    return {
        "WA": float(accuracy_score(yt, yp)),
        "UA": float(recall_score(yt, yp, labels=labels, average="macro", zero_division=0)),
        "F1": float(f1_score(yt, yp, labels=labels, average="macro", zero_division=0)),
        "WF1": float(f1_score(yt, yp, labels=labels, average="weighted", zero_division=0)),
    }


def per_class_f1(y_true: Any, y_pred: Any, num_classes: int | None = None) -> np.ndarray:
    """F1 of each class (``f1_score(average=None)``), float64 array.

    Its length is ``num_classes`` when given (entry ``c`` is class ``c``); otherwise one entry per class id seen
    in ``y_true`` or ``y_pred``, sorted (sklearn's convention). Undefined values (class never true nor predicted)
    are 0.
    """
    yt, yp = _check_pair(y_true, y_pred, num_classes)
    return np.asarray(f1_score(yt, yp, labels=_labels(num_classes), average=None, zero_division=0), dtype=np.float64)


def confusion_counts(y_true: Any, y_pred: Any, num_classes: int | None = None) -> np.ndarray:
    """``sklearn.metrics.confusion_matrix``: entry ``[i, j]`` counts items of true class ``i`` predicted as ``j``
    (int64). With ``num_classes`` the matrix is ``num_classes x num_classes`` even when a class never occurs, so
    the matrices of every condition and fold can be added and compared."""
    yt, yp = _check_pair(y_true, y_pred, num_classes)
    return np.asarray(confusion_matrix(yt, yp, labels=_labels(num_classes)), dtype=np.int64)


def condition_confusions(y_true: Any, y_pred: Any, condition: Any, num_classes: int) -> dict[str, list[list[int]]]:
    """One confusion matrix (counts, rows = true class) per condition present, in condition order, and
    ``"overall"``: all items pooled. Keys as in :func:`condition_metrics`."""
    yt, yp = _check_pair(y_true, y_pred, num_classes)
    cond = _as_label_array(condition, "condition")
    if cond.shape[0] != yt.shape[0]:
        raise ValueError(f"condition and y_true differ in length: {cond.shape[0]} vs {yt.shape[0]}")
    out = {CONDITION_LABELS[c]: confusion_counts(yt[cond == c], yp[cond == c], num_classes).tolist()
           for c in sorted(set(cond.tolist()))}
    out["overall"] = confusion_counts(yt, yp, num_classes).tolist()
    return out


def condition_metrics(
    y_true: Any, y_pred: Any, condition: Any, num_classes: int | None = None
) -> dict[str, dict[str, float]]:
    """Metrics per missing-modality condition, their six-condition average, and the pooled value.

    This is MMIN's test protocol: every test utterance is evaluated under each of the six missing conditions
    (``condition`` 0..5 = {a}, {v}, {l}, {a,v}, {a,l}, {v,l}), and possibly also with all modalities
    (``condition`` 6 = {a,v,l}).

    Parameters
    ----------
    y_true, y_pred : array-like of int, shape [N]
        Class ids, as for :func:`classification_metrics`.
    condition : array-like of int, shape [N]
        Condition index of each item, in ``0 .. 6`` (``batch["condition"]`` of the data pipeline).
    num_classes : int, optional
        Passed to :func:`classification_metrics` for every slice, so that all slices average over the same
        classes.

    Returns
    -------
    dict
        ``{CONDITION_LABELS[c]: metrics}`` for each condition ``c`` present (in condition order), then
        ``"average"``: the mean over the six missing conditions of each metric -- added only when all six are
        present, since an average over a subset would not be comparable with the papers' tables -- and
        ``"overall"``: the metrics of all items pooled (MMIN's logged "total" numbers over the 6N items; it
        includes the full-condition items if there are any).

    Raises
    ------
    ValueError
        On length mismatches, empty input, or condition ids outside ``0 .. 6``.
    """
    yt, yp = _check_pair(y_true, y_pred, num_classes)
    cond = _as_label_array(condition, "condition")
    if cond.shape[0] != yt.shape[0]:
        raise ValueError(f"condition and y_true differ in length: {cond.shape[0]} vs {yt.shape[0]}")
    bad = (cond < 0) | (cond >= len(CONDITION_LABELS))
    if bad.any():
        raise ValueError(
            f"condition ids must be in 0..{len(CONDITION_LABELS) - 1}, got {sorted(set(cond[bad].tolist()))}"
        )

    out: dict[str, dict[str, float]] = {}
    present = sorted(set(cond.tolist()))
    for c in present:
        mask = cond == c
        out[CONDITION_LABELS[c]] = classification_metrics(yt[mask], yp[mask], num_classes)
    if all(c in present for c in range(NUM_MISSING_CONDITIONS)):
        six = [out[CONDITION_LABELS[c]] for c in range(NUM_MISSING_CONDITIONS)]
        out["average"] = {k: float(np.mean([m[k] for m in six])) for k in METRIC_NAMES}
    out["overall"] = classification_metrics(yt, yp, num_classes)
    return out


def _as_float_array(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.float64)


def _check_regression_pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    yt = _as_float_array(y_true, "y_true")
    yp = _as_float_array(y_pred, "y_pred")
    for name, arr in (("y_true", yt), ("y_pred", yp)):
        # [N] or [N, 1] (a regression head's output); anything wider is a mistake, not something to flatten.
        if not (arr.ndim == 1 or (arr.ndim == 2 and arr.shape[1] == 1)):
            raise ValueError(f"{name} must have shape [N] or [N, 1], got {tuple(arr.shape)}")
    yt, yp = yt.reshape(-1), yp.reshape(-1)
    if yt.shape[0] != yp.shape[0]:
        raise ValueError(f"y_true and y_pred differ in length: {yt.shape[0]} vs {yp.shape[0]}")
    if yt.shape[0] == 0:
        raise ValueError("cannot compute metrics of an empty set of predictions")
    for name, arr in (("y_true", yt), ("y_pred", yp)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} holds {int((~np.isfinite(arr)).sum())} non-finite values")
    return yt, yp


def _multiclass_acc(yt: np.ndarray, yp: np.ndarray, c: float) -> float:
    return float(np.mean(np.round(np.clip(yp, -c, c)) == np.round(np.clip(yt, -c, c))))


def regression_metrics(y_true: Any, y_pred: Any) -> dict[str, float]:
    """MOSI / MOSEI sentiment metrics of one set of continuous predictions (MMSA ``MetricsTop`` semantics).

    Parameters
    ----------
    y_true, y_pred : array-like of float, shape [N] or [N, 1]
        Reference sentiment (in [-3, 3]) and predictions (numpy, torch on any device, lists).

    Returns
    -------
    dict
        ``{"Acc2_has0", "F1_has0", "Acc2_non0", "F1_non0", "Acc7", "Acc5", "MAE", "Corr"}`` as Python floats; the
        accuracies and F1s are fractions in [0, 1]. See the module docstring for the definitions.

    Notes
    -----
    Two degenerate cases, where MMSA would give ``nan`` (and a warning): ``Corr`` is 0.0 when the predictions or
    the labels are constant (no linear relation can be measured; a constant predictor should not make model
    selection or averaging over seeds produce ``nan``), and ``Acc2_non0`` / ``F1_non0`` are ``nan`` when every
    label is 0 (the subset they are defined on is empty). Weighted F1 uses ``zero_division=0``: a class that is
    never predicted gets F1 0, which is sklearn's default value without its warning.

    Raises
    ------
    ValueError
        On empty input, a length mismatch, non-finite values, or a shape other than [N] / [N, 1].
    """
    yt, yp = _check_regression_pair(y_true, y_pred)
    bt, bp = yt >= 0, yp >= 0
    out = {
        "Acc2_has0": float(accuracy_score(bt, bp)),
        "F1_has0": float(f1_score(bt, bp, average="weighted", zero_division=0)),
    }
    nz = yt != 0
    if nz.any():
        bt, bp = yt[nz] > 0, yp[nz] > 0
        out["Acc2_non0"] = float(accuracy_score(bt, bp))
        out["F1_non0"] = float(f1_score(bt, bp, average="weighted", zero_division=0))
    else:
        out["Acc2_non0"] = out["F1_non0"] = float("nan")
    out["Acc7"] = _multiclass_acc(yt, yp, 3.0)
    out["Acc5"] = _multiclass_acc(yt, yp, 2.0)
    out["MAE"] = float(np.mean(np.abs(yp - yt)))
    if np.ptp(yt) == 0 or np.ptp(yp) == 0:
        out["Corr"] = 0.0
    else:
        out["Corr"] = float(np.corrcoef(yp, yt)[0, 1])
    return out


def recovery_metrics(recovered: Any, target: Any) -> dict[str, float]:
    """How close recovered features are to the true ones: ``{"MSE", "cosine"}``.

    Parameters
    ----------
    recovered, target : array-like, shape [B, ...]
        Same shape; the first dimension indexes samples (e.g. IMDer's ``[B, 32, 48]`` projections).

    Returns
    -------
    dict
        ``MSE``: mean squared difference over all elements. ``cosine``: the cosine similarity of each sample's
        flattened features with its target, averaged over samples; a sample whose recovered or target vector is all
        zero counts as cosine 0 (undefined direction). Computed in float64.
    """
    r = _as_float_array(recovered, "recovered")
    t = _as_float_array(target, "target")
    if r.shape != t.shape:
        raise ValueError(f"recovered and target differ in shape: {tuple(r.shape)} vs {tuple(t.shape)}")
    if r.ndim < 1 or r.shape[0] == 0:
        raise ValueError(f"recovered must be [B, ...] with B >= 1, got shape {tuple(r.shape)}")
    for name, arr in (("recovered", r), ("target", t)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} holds {int((~np.isfinite(arr)).sum())} non-finite values")
    r, t = r.reshape(r.shape[0], -1), t.reshape(t.shape[0], -1)
    denom = np.linalg.norm(r, axis=1) * np.linalg.norm(t, axis=1)
    dots = np.einsum("ij,ij->i", r, t)
    cos = np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)
    return {"MSE": float(np.mean((r - t) ** 2)) if r.size else 0.0, "cosine": float(np.mean(cos))}


def _check_constants(labels: Sequence[str], full: int) -> None:
    # The slicing above relies on this layout; fail loudly at import if the shared constants ever change.
    if len(labels) != NUM_MISSING_CONDITIONS + 1 or full != NUM_MISSING_CONDITIONS:
        raise ImportError("mmer_ext.data.protocols: expected 6 missing conditions followed by the full one")


_check_constants(CONDITION_LABELS, FULL_CONDITION)
