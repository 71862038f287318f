"""Classification metrics of the MMIN family, overall and per missing-modality condition.

Every number here comes from scikit-learn, on purpose: the papers we compare against (MMIN, IF-MMIN, NMER, MMGCN)
report numbers computed with ``sklearn.metrics``, so calling the same functions is the only way to be sure that a
difference in a table is a difference in the model and not in the arithmetic. This module only converts inputs,
validates them, and slices them by condition.

Definitions (SPEC section 3):

- ``WA`` (weighted accuracy) = ``accuracy_score``: the fraction of items classified correctly.
- ``UA`` (unweighted accuracy, UAR) = ``recall_score(average="macro")``: the mean of the per-class recalls, so every
  class counts the same whatever its size.
- ``F1`` = ``f1_score(average="macro")`` (MMIN's logs).
- ``WF1`` = ``f1_score(average="weighted")`` (MMGCN / ERC papers).

All four are fractions in [0, 1]; the report module turns them into percentages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, recall_score

from mmer_ext.data.protocols import CONDITION_LABELS, FULL_CONDITION

__all__ = [
    "METRIC_NAMES",
    "NUM_MISSING_CONDITIONS",
    "classification_metrics",
    "condition_metrics",
    "per_class_f1",
]

#: Keys of the dict returned by :func:`classification_metrics`, in the order the report prints them.
METRIC_NAMES: tuple[str, ...] = ("WA", "UA", "F1", "WF1")

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


def _check_constants(labels: Sequence[str], full: int) -> None:
    # The slicing above relies on this layout; fail loudly at import if the shared constants ever change.
    if len(labels) != NUM_MISSING_CONDITIONS + 1 or full != NUM_MISSING_CONDITIONS:
        raise ImportError("mmer_ext.data.protocols: expected 6 missing conditions followed by the full one")


_check_constants(CONDITION_LABELS, FULL_CONDITION)
