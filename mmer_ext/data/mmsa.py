r"""MOSI / MOSEI in MMSA's pickles (for IMDer): the loader and a pickle-free cache of the three splits, all as
:class:`~mmer_ext.data.sequences.SequenceDataset` splits.

MMSA pickles (as IMDer's ``data_loader.py`` reads them; github.com/mdswyz/IMDer)
-----------------------
:func:`load_mmsa` reads MMSA's ``aligned_50.pkl`` / ``unaligned_50.pkl``: a dict with ``"train"``, ``"valid"``,
``"test"``, each a dict of numpy arrays with ``N`` rows: ``text`` ``(N, 50, D_L)`` (precomputed embeddings),
``text_bert`` ``(N, 3, 50)``, ``audio`` ``(N, T_A, 5 | 74)``, ``vision`` ``(N, T_V, 20 | 35)``,
``regression_labels`` ``(N,)``, ``id``, ``raw_text``, and for unaligned data ``audio_lengths`` / ``vision_lengths``.
As MMSA's loader does: every feature is cast to float32 and ``-inf`` in ``audio`` (log-energies of silent frames) is
replaced by 0; ``"valid"`` becomes ``"val"``. ``classification_labels`` and ``annotations`` are not read (the label is
``regression_labels``). For unaligned data the L length is the attention-mask sum of ``text_bert`` when present
(``T_L`` otherwise), whether or not ``use_bert`` keeps ``text_bert`` itself.

Anything else is a :class:`~mmer_ext.data.DataFormatError` naming the file, the split and the key: a missing key,
a wrong rank, splits or keys disagreeing on ``N``, non-finite labels, and non-finite feature values left after the
``-inf`` fix (``nonfinite="zero"`` replaces those by 0 instead), because a NaN feature silently turns every loss
into NaN.

A pickle can execute arbitrary code when loaded, so :func:`load_mmsa` warns with
:class:`~mmer_ext.data.UnsafePickleWarning` before unpickling. :func:`convert_mmsa` rewrites a pickle once into
``{train,val,test}.safetensors`` + ``meta.json`` (all written atomically; the JSON last, with a random token that each
split file repeats, so a reader never mixes two conversions), which ``load_dataset("mmsa-cache:DIR")`` /
:func:`load_mmsa_cache` read with no pickle involved.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

from mmer_ext._atomic import atomic_write_bytes, atomic_write_text
from mmer_ext.data.checks import check_ids, check_range
from mmer_ext.data.errors import DataFormatError, read_untrusted_pickle
from mmer_ext.data.protocols import MODALITIES
from mmer_ext.data.sequences import LABEL_RANGE, SequenceDataset, read_sequence_file

__all__ = [
    "MMSA_SPLITS",
    "convert_mmsa",
    "load_mmsa",
    "load_mmsa_cache",
    "save_sequence_splits",
]

_CACHE_FORMAT = "mmer_ext.MMSACache/1"
_META_FILE = "meta.json"
_SPLITS = ("train", "val", "test")
#: Split keys of an MMSA pickle, and the names they get here.
MMSA_SPLITS = {"train": "train", "valid": "val", "test": "test"}
# Pickle key of each modality's features.
_FEATURE_KEYS = {"A": "audio", "V": "vision", "L": "text"}


def _array(d: Mapping, key: str, where: str, dtype=np.float32) -> np.ndarray:
    if key not in d:
        raise DataFormatError(f"{where}: no key {key!r} (keys: {sorted(map(str, d))})")
    try:
        return np.asarray(d[key], dtype=dtype)
    except (TypeError, ValueError) as e:
        raise DataFormatError(f"{where}: key {key!r} is not a numeric array ({e})") from e


def _strings(d: Mapping, key: str, where: str, n: int) -> list[str] | None:
    if key not in d:
        return None
    raw = d[key]
    vals = raw.reshape(-1).tolist() if isinstance(raw, np.ndarray) else list(raw)
    if len(vals) != n:
        raise DataFormatError(f"{where}: key {key!r} has {len(vals)} entries, expected N = {n}")
    return [bytes(v).decode("utf-8", "replace") if isinstance(v, (bytes, bytearray, np.bytes_)) else str(v)
            for v in vals]


def _lengths_from(d: Mapping, key: str, where: str, n: int, t: int) -> np.ndarray:
    arr = _array(d, key, where, dtype=np.float64).reshape(-1)
    if arr.shape[0] != n:
        raise DataFormatError(f"{where}: key {key!r} has {arr.shape[0]} entries, expected N = {n}")
    if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
        raise DataFormatError(f"{where}: key {key!r} must hold integer lengths")
    if n and (arr.min() < 0 or arr.max() > t):
        raise DataFormatError(f"{where}: key {key!r} has lengths in [{int(arr.min())}, {int(arr.max())}], outside "
                              f"[0, {t}] (the padded sequence length)")
    return arr.astype(np.int64)


def _parse_mmsa_split(d: Any, path: str, key: str, use_bert: bool | None, nonfinite: str) -> SequenceDataset:
    where = f"{path}: split {key!r}"
    if not isinstance(d, Mapping):
        raise DataFormatError(f"{where} must be a dict of arrays, got {type(d).__name__}")
    feats = {}
    for m, k in _FEATURE_KEYS.items():
        arr = _array(d, k, where)
        if arr.ndim != 3:
            raise DataFormatError(f"{where}: key {k!r} must be (N, T, D), got shape {arr.shape}")
        feats[m] = arr
    labels = _array(d, "regression_labels", where)
    if not (labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1)):
        raise DataFormatError(f"{where}: key 'regression_labels' must be (N,), got shape {labels.shape}")
    labels = labels.reshape(-1)
    n = feats["A"].shape[0]
    sizes = {_FEATURE_KEYS[m]: feats[m].shape[0] for m in MODALITIES}
    sizes["regression_labels"] = labels.shape[0]
    if len(set(sizes.values())) != 1:
        raise DataFormatError(f"{where}: keys disagree on the number of samples N: {sizes}")
    bad = ~np.isfinite(labels)
    if bad.any():
        raise DataFormatError(f"{where}: key 'regression_labels' holds {int(bad.sum())} non-finite values")
    check_range(labels, *LABEL_RANGE, f"{where}: key 'regression_labels'")
    # MMSA's loader zeroes -inf in the audio (log-energies of silence); do the same, nothing more, silently.
    # np.where makes new arrays, so the caller's pickle object is never modified.
    neg_inf = feats["A"] == -np.inf
    if neg_inf.any():
        feats["A"] = np.where(neg_inf, np.float32(0), feats["A"])
    for m, k in _FEATURE_KEYS.items():
        bad = ~np.isfinite(feats[m])
        if bad.any():
            if nonfinite != "zero":
                raise DataFormatError(f"{where}: key {k!r} holds {int(bad.sum())} non-finite values (NaN / inf) "
                                      "after replacing -inf in audio by 0; pass nonfinite='zero' to zero them too")
            feats[m] = np.where(bad, np.float32(0), feats[m])
    text_bert = None
    unaligned = "audio_lengths" in d or "vision_lengths" in d
    # Unaligned data takes its text lengths from the BERT attention mask, so read text_bert whenever it is there.
    want_bert = use_bert or ((use_bert is None or unaligned) and "text_bert" in d)
    if want_bert:
        text_bert = _array(d, "text_bert", where, dtype=np.float64)
        if text_bert.ndim != 3 or text_bert.shape[0] != n or text_bert.shape[1] != 3:
            raise DataFormatError(f"{where}: key 'text_bert' must be (N, 3, T) with N = {n}, got shape "
                                  f"{text_bert.shape}")
        if not np.all(np.isfinite(text_bert)) or not np.all(text_bert == np.round(text_bert)):
            raise DataFormatError(f"{where}: key 'text_bert' must hold integer token ids / masks")
        text_bert = text_bert.astype(np.int64)
    t = [feats[m].shape[1] for m in MODALITIES]
    lengths = np.tile(np.asarray(t, dtype=np.int64), (n, 1))
    if "audio_lengths" in d:
        lengths[:, 0] = _lengths_from(d, "audio_lengths", where, n, t[0])
    if "vision_lengths" in d:
        lengths[:, 1] = _lengths_from(d, "vision_lengths", where, n, t[1])
    if unaligned and text_bert is not None and text_bert.shape[2] == t[2]:
        lengths[:, 2] = text_bert[:, 1].sum(1).clip(0, t[2])
    ids = _strings(d, "id", where, n)
    raw = _strings(d, "raw_text", where, n)
    try:
        return SequenceDataset(feats["A"], feats["V"], feats["L"], labels, ids, lengths=lengths, raw_text=raw,
                               text_bert=text_bert if use_bert or use_bert is None else None)
    except ValueError as e:
        raise DataFormatError(f"{where}: {e}") from e


def _named_ids(splits: Mapping[str, SequenceDataset]) -> dict[str, list[str]]:
    # Splits without ids get seq_0, seq_1, ... each, which repeat across splits by construction: not a leak.
    return {name: ds.ids for name, ds in splits.items() if ds.ids != [f"seq_{i}" for i in range(len(ds))]}


def _parse_mmsa(obj: Any, path: str, use_bert: bool | None, nonfinite: str) -> dict[str, SequenceDataset]:
    if nonfinite not in ("error", "zero"):
        raise ValueError(f"nonfinite must be 'error' or 'zero', got {nonfinite!r}")
    if not isinstance(obj, Mapping):
        raise DataFormatError(f"{path}: expected a dict with 'train', 'valid', 'test', got {type(obj).__name__}")
    out = {}
    for key, name in MMSA_SPLITS.items():
        src = key if key in obj else ("val" if key == "valid" and "val" in obj else None)
        if src is None:
            raise DataFormatError(f"{path}: no split {key!r} (keys: {sorted(map(str, obj))})")
        out[name] = _parse_mmsa_split(obj[src], path, src, use_bert, nonfinite)
    check_ids(_named_ids(out), path, "sample id")
    first = out["train"]
    for name, ds in out.items():
        if ds.dims != first.dims or ds.seq_len != first.seq_len:
            raise DataFormatError(f"{path}: split {name!r} has dims {tuple(ds.dims)} / lengths {ds.seq_len}, "
                                  f"but 'train' has {tuple(first.dims)} / {first.seq_len}")
    return out


def load_mmsa(path: str | os.PathLike, *, use_bert: bool = False, nonfinite: str = "error",
              ) -> dict[str, SequenceDataset]:
    """Load an MMSA ``aligned_50.pkl`` / ``unaligned_50.pkl`` (MOSI, MOSEI; the layout IMDer's ``data_loader.py`` reads). Emits UnsafePickleWarning.

    Parameters
    ----------
    path : path
        The pickle.
    use_bert : bool
        Also read ``text_bert`` (``[N, 3, 50]`` input ids / attention mask / token type ids, stored as int64) for a
        model with its own BERT; L is the precomputed ``text`` either way.
    nonfinite : {"error", "zero"}
        What to do with NaN / inf feature values left after MMSA's ``-inf -> 0`` audio fix.

    Returns
    -------
    dict
        ``{"train", "val", "test"}`` -> :class:`SequenceDataset`; ids from ``id``, labels from
        ``regression_labels``.
    """
    path = os.fspath(path)
    return _parse_mmsa(read_untrusted_pickle(path, "convert_mmsa", "mmsa-cache"), path, bool(use_bert), nonfinite)


def convert_mmsa(pkl_path: str | os.PathLike, out_dir: str | os.PathLike, *, nonfinite: str = "error") -> str:
    """Rewrite an MMSA pickle as ``out_dir/{train,val,test}.safetensors`` + ``out_dir/meta.json`` (no pickle).

    ``text_bert`` is kept when every split has it (so the copy serves ``use_bert`` either way). Each file is written
    atomically, the JSON last; every file carries the same random token. Load the result with
    ``load_dataset("mmsa-cache:OUT_DIR")`` or :func:`load_mmsa_cache`. Unpickling ``pkl_path`` still runs its code
    once (hence the warning): convert only files you trust, then share the converted directory. Returns ``out_dir``.
    """
    src = os.fspath(pkl_path)
    obj = read_untrusted_pickle(src, "convert_mmsa", "mmsa-cache", converting=True)
    has_bert = isinstance(obj, Mapping) and all(
        isinstance(obj.get(k), Mapping) and "text_bert" in obj[k] for k in ("train", "valid", "test"))
    splits = _parse_mmsa(obj, src, True if has_bert else False, nonfinite)
    return save_sequence_splits(splits, out_dir, source=os.path.basename(src))


def save_sequence_splits(splits: Mapping[str, SequenceDataset], out_dir: str | os.PathLike, *,
                         source: str | None = None) -> str:
    """Write ``{"train", "val", "test"}`` :class:`SequenceDataset` splits in the format of :func:`convert_mmsa`
    (``out_dir/{train,val,test}.safetensors`` + ``meta.json``), so your own sequences load with
    ``--data mmsa-cache:OUT_DIR`` like a converted MMSA pickle. ``text_bert`` is recorded as available when every
    split has it. Each file is written atomically, the JSON last. Returns ``out_dir``.
    """
    out_dir = os.fspath(out_dir)
    if sorted(splits) != sorted(_SPLITS):
        raise ValueError(f"save_sequence_splits: splits must be exactly {list(_SPLITS)}, got {sorted(splits)}")
    first = splits["train"]
    for name, ds in splits.items():
        if not isinstance(ds, SequenceDataset):
            raise ValueError(f"save_sequence_splits: split {name!r} is a {type(ds).__name__}, not a SequenceDataset")
        if ds.dims != first.dims:
            raise ValueError(f"save_sequence_splits: split {name!r} has dims {tuple(ds.dims)}, train has "
                             f"{tuple(first.dims)}")
    has_bert = all(ds.text_bert is not None for ds in splits.values())
    token = uuid.uuid4().hex
    for name, ds in splits.items():
        ds = ds if has_bert else ds.without_text_bert()
        atomic_write_bytes(os.path.join(out_dir, f"{name}.safetensors"), ds._serialise({"token": token}))
    meta = {
        "format": _CACHE_FORMAT, "token": token, "source": source,
        "aligned": all(ds.aligned for ds in splits.values()), "dims": list(first.dims),
        "seq_len": list(first.seq_len), "sizes": {k: len(ds) for k, ds in splits.items()},
        "text_bert": has_bert,
    }
    atomic_write_text(os.path.join(out_dir, _META_FILE), json.dumps(meta, indent=1))
    return out_dir


def load_mmsa_cache(directory: str | os.PathLike, *, use_bert: bool = False) -> dict[str, SequenceDataset]:
    """Read what :func:`convert_mmsa` wrote (never unpickles). ``use_bert`` keeps ``text_bert`` (an error if the
    source pickle had none); otherwise it is dropped."""
    directory = os.fspath(directory)
    meta_file = os.path.join(directory, _META_FILE)
    if not os.path.isfile(meta_file):
        raise DataFormatError(f"{meta_file}: file not found (expected the output of convert_mmsa in {directory})")
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataFormatError(f"{meta_file}: cannot read JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != _CACHE_FORMAT:
        raise DataFormatError(f"{meta_file}: not an MMSA cache (format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected "
                              f"{_CACHE_FORMAT!r})")
    if use_bert and not meta.get("text_bert"):
        raise DataFormatError(f"{meta_file}: the converted pickle had no 'text_bert'; load with use_bert=False")
    out = {}
    for name in _SPLITS:
        ds, file_meta = read_sequence_file(os.path.join(directory, f"{name}.safetensors"))
        if file_meta.get("token") != meta.get("token"):
            raise DataFormatError(f"{directory}: {name}.safetensors and {_META_FILE} come from different "
                                  "conversions; convert again")
        out[name] = ds if use_bert else ds.without_text_bert()
    check_ids(_named_ids(out), directory, "sample id")
    return out
