"""The checks every loader applies to what it reads, in one place, so that the utterance, dialogue and sequence
formats refuse the same mistakes with the same words: ids listed twice or in two splits, utterances without frames,
NaN / inf in features, labels that are not one class. Each message names the file, the key and the row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from mmer_ext.data.errors import DataFormatError

__all__ = ["DataFormatError", "check_finite", "check_frames", "check_ids", "check_range", "one_hot_classes"]


def check_finite(x: np.ndarray | torch.Tensor, where: str, row_name: str = "row") -> None:
    """Refuse NaN / inf in ``x``, naming the first ``row`` (index along axis 0) that holds one."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.size == 0 or arr.dtype.kind not in "fc":
        return
    finite = np.isfinite(arr)
    if finite.all():
        return
    bad = ~finite.reshape(arr.shape[0], -1).all(axis=1) if arr.ndim else np.array([True])
    row = int(np.flatnonzero(bad)[0])
    raise DataFormatError(f"{where}: {row_name} {row} holds NaN or infinite values "
                          f"({int((~finite).sum())} non-finite value(s) in all)")


def check_range(x: np.ndarray | torch.Tensor, low: float, high: float, where: str) -> None:
    """Refuse values outside ``[low, high]`` (NaN included), naming the first row that holds one."""
    arr = (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).reshape(len(x), -1)
    bad = ~np.all((arr >= low) & (arr <= high), axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataFormatError(f"{where}: row {row} is {arr[row].tolist() if arr.shape[1] > 1 else arr[row, 0].item()}, "
                              f"outside [{low:g}, {high:g}]")


def check_frames(num_frames: int, where: str) -> None:
    """An utterance needs at least one frame: pooling zero frames yields NaN or silently zero features."""
    if num_frames < 1:
        raise DataFormatError(f"{where}: the utterance has 0 frames")


def check_ids(splits: Mapping[str, Sequence[object]], where: str, what: str = "id") -> None:
    """Refuse an id listed twice within a split or present in two splits (a train/test leak)."""
    seen: dict[str, str] = {}
    for split, ids in splits.items():
        first: dict[str, int] = {}
        for row, raw in enumerate(ids):
            key = str(raw)
            if key in first:
                raise DataFormatError(f"{where}: {what} {key!r} is listed twice in {split} (rows {first[key]} and "
                                      f"{row})")
            first[key] = row
            if key in seen:
                raise DataFormatError(f"{where}: {what} {key!r} is in both {seen[key]} and {split}; the splits must "
                                      "be disjoint")
        for key in first:
            seen[key] = split


def one_hot_classes(arr: np.ndarray, where: str) -> np.ndarray:
    """The class of each row of a one-hot label array; every row must be finite, 0/1, with exactly one 1."""
    check_finite(arr, where)
    valid = np.all((arr == 0) | (arr == 1), axis=1) & (arr.sum(axis=1) == 1)
    if not valid.all():
        row = int(np.flatnonzero(~valid)[0])
        raise DataFormatError(f"{where}: row {row} is {arr[row].tolist()}, not one-hot (exactly one 1, the rest 0)")
    return arr.argmax(axis=1)
