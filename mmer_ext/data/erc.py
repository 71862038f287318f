r"""The DialogueGCN / MMGCN dialogue pickles (IEMOCAP-ERC, MELD) and the pickle-free on-disk format they convert to.

:func:`load_iemocap_erc` reads DialogueGCN / MMGCN's ``IEMOCAP_features.pkl`` (9-tuple ``videoIDs, videoSpeakers,
videoLabels, videoText, videoAudio, videoVisual, videoSentence, trainVid, testVid``; speakers ``'M'``/``'F'`` -> 0/1;
labels 0 hap, 1 sad, 2 neu, 3 ang, 4 exc, 5 fru) and :func:`load_meld` ``MELD_features_raw1.pkl`` (10-tuple, the same
first seven with 9-d one-hot speakers -> argmax, labels 0 neutral .. 6 anger, ``trainVid`` = train + dev, a trailing
unused item). Text goes to L, audio to A, visual to V; the feature sizes are read from the file (the conv-emotion
file has 100 / 100 / 512, MMGCN's 100 / 1582 / 342). Both return ``{"train", "val", "test"}``: by default ``val`` is
a seeded 10 % dialogue-level split of the training dialogues. ``val_from="test"`` reproduces the authors' protocol
(MMGCN trains with no validation set and reports the best *test* weighted F1 over epochs): ``val`` is then the test
set itself, so model selection peeks at the test labels - use it only to compare with the published numbers.

A pickle can execute arbitrary code when loaded, so both loaders emit :class:`UnsafePickleWarning`;
:func:`convert_pickle` rewrites a pickle once into ``features.safetensors`` + ``dialogues.json`` (both written
atomically), which :func:`load_dialogue_dataset` reads with ``"dialogues:DIR"`` and no pickle involved.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mmer_ext._atomic import atomic_write_bytes, atomic_write_text
from mmer_ext.corpora import IEMOCAP_ERC_CLASS_FREQUENCIES, IEMOCAP_ERC_CLASS_NAMES
from mmer_ext.data.checks import check_finite, check_ids
from mmer_ext.data.dialogue import DialogueDataset, with_validation
from mmer_ext.data.errors import DataFormatError, NonstandardSplitWarning, read_untrusted_pickle
from mmer_ext.data.protocols import MODALITIES
from mmer_ext.data.utterance import ModalityDims

__all__ = [
    "IEMOCAP_ERC_CLASS_FREQUENCIES",
    "IEMOCAP_ERC_CLASS_NAMES",
    "IEMOCAP_ERC_DIMS",
    "MELD_CLASS_NAMES",
    "MELD_DIMS",
    "convert_pickle",
    "load_dialogue_splits",
    "load_iemocap_erc",
    "load_meld",
    "save_dialogue_splits",
]

MELD_CLASS_NAMES = ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")
#: Feature sizes of MMGCN's pickles (A = IS10 audio, V = DenseFace, L = TextCNN); informative only, loaders read dims.
IEMOCAP_ERC_DIMS = ModalityDims(1582, 342, 100)
MELD_DIMS = ModalityDims(300, 342, 600)
#: ``val_from`` values: carve validation dialogues from train (default) or reuse the test set (authors' protocol).

# Standard splits: (dialogues, utterances) per split, None = not fixed by the authors' data.
_STANDARD_SPLITS = {
    "iemocap-erc": {"train": (120, 5810), "test": (31, 1623)},
    "meld": {"train": None, "test": (280, 2610)},
}
_TUPLE_FIELDS = ("videoIDs", "videoSpeakers", "videoLabels", "videoText", "videoAudio", "videoVisual",
                 "videoSentence", "trainVid", "testVid")
_TUPLE_LEN = {"iemocap-erc": 9, "meld": 10}
_FEATURE_FILE = "features.safetensors"
_INDEX_FILE = "dialogues.json"
_FORMAT = "mmer_ext.Dialogues/1"



# ======================================================================================================================
# DialogueGCN-style pickles
# ======================================================================================================================

def _ordered_ids(ids: Any, what: str, path: str) -> list:
    if isinstance(ids, (set, frozenset)):
        try:
            return sorted(ids)  # a set has no order; sort so that splits and batches are reproducible
        except TypeError:
            return sorted(ids, key=str)
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise DataFormatError(f"{path}: {what} must be a list or set of dialogue ids, got {type(ids).__name__}")
    out = list(ids.tolist() if isinstance(ids, np.ndarray) else ids)
    check_ids({what: out}, path, "dialogue id")
    return out


def _decode_speakers(raw: Any, vid: Any, path: str, kind: str) -> tuple[torch.Tensor, int]:
    seq = list(raw.tolist() if isinstance(raw, np.ndarray) else raw)
    if seq and all(isinstance(s, (str, bytes, np.str_)) for s in seq):
        out = []
        for s in seq:
            s = s.decode() if isinstance(s, bytes) else str(s)
            if s not in ("M", "F"):
                raise DataFormatError(f"{path}: dialogue {vid!r}: speaker {s!r} is neither 'M' nor 'F'")
            out.append(0 if s == "M" else 1)  # one-hot [1, 0] for 'M', [0, 1] for 'F' -> argmax
        return torch.tensor(out, dtype=torch.int64), 2
    try:
        arr = np.asarray(seq, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataFormatError(f"{path}: dialogue {vid!r}: speakers are neither 'M'/'F' nor one-hot rows") from e
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise DataFormatError(f"{path}: dialogue {vid!r}: speakers have shape {arr.shape}, expected one-hot (n, S)"
                              + (" or 'M'/'F' strings" if kind == "iemocap-erc" else ""))
    return torch.as_tensor(arr.argmax(axis=1), dtype=torch.int64), int(arr.shape[1])


def _parse_dialogue_tuple(obj: Any, path: str, kind: str, class_names: Sequence[str],
                          check_split: str) -> tuple[DialogueDataset, DialogueDataset]:
    want = _TUPLE_LEN[kind]
    if not isinstance(obj, (tuple, list)):
        raise DataFormatError(f"{path}: expected a {want}-tuple ({', '.join(_TUPLE_FIELDS)}"
                              f"{', <unused>' if want == 10 else ''}), got a {type(obj).__name__}")
    if len(obj) != want:
        other = {9: "the IEMOCAP layout (use load_iemocap_erc / 'iemocap-erc:PATH')",
                 10: "the MELD layout (use load_meld / 'meld:PATH')"}.get(len(obj))
        hint = f"; a {len(obj)}-tuple is {other}" if other else ""
        raise DataFormatError(f"{path}: expected a {want}-tuple, got {len(obj)} items{hint}")
    tables = dict(zip(_TUPLE_FIELDS, obj[:9]))
    for name in _TUPLE_FIELDS[:7]:
        if not isinstance(tables[name], Mapping):
            raise DataFormatError(f"{path}: {name} (item {_TUPLE_FIELDS.index(name)}) must be a dict keyed by "
                                  f"dialogue id, got {type(tables[name]).__name__}")
    train_ids = _ordered_ids(tables["trainVid"], "trainVid", path)
    test_ids = _ordered_ids(tables["testVid"], "testVid", path)
    check_ids({"trainVid": train_ids, "testVid": test_ids}, path, "dialogue id")
    num_classes = len(class_names)
    dims: list[int | None] = [None, None, None]
    num_speakers = 0
    parsed = {}
    for split, ids in (("train", train_ids), ("test", test_ids)):
        rows = []
        for vid in ids:
            where = f"{path}: dialogue {vid!r} ({'trainVid' if split == 'train' else 'testVid'})"
            for name in _TUPLE_FIELDS[:6]:
                if vid not in tables[name]:
                    raise DataFormatError(f"{where} has no entry in {name}")
            labels_raw = np.asarray(tables["videoLabels"][vid])
            if labels_raw.ndim != 1 or labels_raw.size == 0:
                raise DataFormatError(f"{where}: videoLabels must be a non-empty list of class ids, got shape "
                                      f"{labels_raw.shape}")
            if labels_raw.dtype.kind not in "iuf" or not np.all(labels_raw == np.round(labels_raw)):
                raise DataFormatError(f"{where}: videoLabels must hold integer class ids")
            labels = torch.as_tensor(labels_raw.astype(np.int64))
            if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
                raise DataFormatError(f"{where}: labels outside 0..{num_classes - 1}: [{int(labels.min())}, "
                                      f"{int(labels.max())}]")
            n = labels.numel()
            utt = tables["videoIDs"][vid]
            utt = list(utt.tolist() if isinstance(utt, np.ndarray) else utt)
            if len(utt) != n:
                raise DataFormatError(f"{where}: {len(utt)} utterance ids in videoIDs but {n} labels")
            speakers, s_dim = _decode_speakers(tables["videoSpeakers"][vid], vid, path, kind)
            if speakers.numel() != n:
                raise DataFormatError(f"{where}: {speakers.numel()} speakers in videoSpeakers but {n} labels")
            num_speakers = max(num_speakers, s_dim)
            feats = {}
            for j, (m, name) in enumerate((("A", "videoAudio"), ("V", "videoVisual"), ("L", "videoText"))):
                try:
                    arr = np.asarray(tables[name][vid], dtype=np.float32)
                except (TypeError, ValueError) as e:
                    raise DataFormatError(f"{where}: {name} is not a numeric (n, D) array ({e})") from e
                if arr.ndim != 2 or arr.shape[0] != n:
                    raise DataFormatError(f"{where}: {name} has shape {arr.shape}, expected ({n}, D) for its {n} "
                                          "utterances")
                check_finite(arr, f"{where}: {name}", "utterance")
                if dims[j] is None:
                    dims[j] = int(arr.shape[1])
                elif arr.shape[1] != dims[j]:
                    raise DataFormatError(f"{where}: {name} has dimension {arr.shape[1]}, other dialogues have "
                                          f"{dims[j]}")
                feats[m] = torch.from_numpy(np.ascontiguousarray(arr))
            rows.append((str(vid), feats, speakers, labels, [str(u) for u in utt]))
        parsed[split] = rows
    if not parsed["train"] or not parsed["test"]:
        raise DataFormatError(f"{path}: trainVid and testVid must both list at least one dialogue")
    _check_standard_split(path, kind, {s: [r[3].numel() for r in rows] for s, rows in parsed.items()}, check_split)
    out = []
    for split in ("train", "test"):
        rows = parsed[split]
        out.append(DialogueDataset(
            [r[1]["A"] for r in rows], [r[1]["V"] for r in rows], [r[1]["L"] for r in rows],
            [r[2] for r in rows], [r[3] for r in rows], [r[0] for r in rows],
            class_names=class_names, num_speakers=num_speakers, dims=ModalityDims(*dims),
            utterance_names=[r[4] for r in rows]))
    return out[0], out[1]


def _check_standard_split(path: str, kind: str, lens: dict[str, list[int]], check_split: str) -> None:
    if check_split not in ("warn", "raise", "ignore"):
        raise ValueError(f"check_split must be 'warn', 'raise' or 'ignore', got {check_split!r}")
    if check_split == "ignore":
        return
    problems = []
    for split, expected in _STANDARD_SPLITS[kind].items():
        if expected is None:
            continue
        got = (len(lens[split]), sum(lens[split]))
        if got != expected:
            problems.append(f"{split} has {got[0]} dialogues / {got[1]} utterances, the standard split has "
                            f"{expected[0]} / {expected[1]}")
    if problems:
        msg = f"{path}: not the standard {kind} split ({'; '.join(problems)}); scores are not comparable with papers"
        if check_split == "raise":
            raise DataFormatError(msg)
        warnings.warn(msg, NonstandardSplitWarning, stacklevel=4)


def _load_pickle_splits(path, kind: str, class_names, *, val_from: str, val_fraction: float, split_seed: int,
                        check_split: str) -> dict[str, DialogueDataset]:
    path = os.fspath(path)
    train, test = _parse_dialogue_tuple(read_untrusted_pickle(path), path, kind, tuple(class_names), check_split)
    return with_validation(train, test, None, val_from=val_from, val_fraction=val_fraction, split_seed=split_seed)


def load_iemocap_erc(
    path: str | os.PathLike,
    *,
    val_from: str = "train",
    val_fraction: float = 0.1,
    split_seed: int = 0,
    check_split: str = "warn",
    class_names: Sequence[str] = IEMOCAP_ERC_CLASS_NAMES,
) -> dict[str, DialogueDataset]:
    """Load DialogueGCN / MMGCN's ``IEMOCAP_features.pkl`` (github.com/hujingwen6666/MMGCN; emits :class:`UnsafePickleWarning`).

    Parameters
    ----------
    path : path
        The pickle: a 9-tuple of dicts keyed by dialogue id plus ``trainVid`` / ``testVid``.
    val_from : {"train", "test"}
        ``"train"``: ``val`` = ``round(val_fraction * 120)`` training dialogues drawn with ``split_seed`` (the
        rest is ``train``); ``"test"``: the authors' protocol, ``val`` *is* the test set (no validation split; the
        best test score over epochs is reported) - optimistic, for reproducing published numbers only.
    val_fraction, split_seed
        Size and seed of the dialogue-level validation split.
    check_split : {"warn", "raise", "ignore"}
        What to do when the file does not hold the standard 120 / 31 dialogues (5810 / 1623 utterances).
    class_names
        Label order 0 happy, 1 sad, 2 neutral, 3 angry, 4 excited, 5 frustrated.

    Returns
    -------
    dict
        ``{"train", "val", "test"}`` -> :class:`DialogueDataset`; speakers 'M' -> 0, 'F' -> 1 (``num_speakers`` 2);
        A = ``videoAudio``, V = ``videoVisual``, L = ``videoText`` with the sizes found in the file.

    Raises
    ------
    DataFormatError
        Missing file, a tuple of the wrong length, a dialogue missing from one of the dicts, or lengths / ids /
        dimensions that disagree (the message names the dialogue).
    """
    return _load_pickle_splits(path, "iemocap-erc", class_names, val_from=val_from, val_fraction=val_fraction,
                               split_seed=split_seed, check_split=check_split)


def load_meld(
    path: str | os.PathLike,
    *,
    val_from: str = "train",
    val_fraction: float = 0.1,
    split_seed: int = 0,
    check_split: str = "warn",
    class_names: Sequence[str] = MELD_CLASS_NAMES,
) -> dict[str, DialogueDataset]:
    """Load MMGCN's ``MELD_features_raw1.pkl`` (github.com/hujingwen6666/MMGCN; emits :class:`UnsafePickleWarning`).

    As :func:`load_iemocap_erc`, for the 10-tuple (the last item is unused): speakers are one-hot lists (9-d) ->
    argmax (``num_speakers`` = their length), labels 0 neutral, 1 surprise, 2 fear, 3 sadness, 4 joy, 5 disgust,
    6 anger. ``trainVid`` holds MELD's train and dev dialogues together (the file does not say which is which), so
    the default validation split is carved from both; the standard test split is 280 dialogues / 2610 utterances.
    """
    return _load_pickle_splits(path, "meld", class_names, val_from=val_from, val_fraction=val_fraction,
                               split_seed=split_seed, check_split=check_split)


# ======================================================================================================================
# Safe format
# ======================================================================================================================
def save_dialogue_splits(splits: Mapping[str, DialogueDataset], directory: str | os.PathLike, *,
                         source: str | None = None) -> str:
    """Write a split dict to ``directory/features.safetensors`` + ``directory/dialogues.json`` (no pickle).

    The dialogues of all splits are stored once each (a dialogue shared by two splits, as with
    ``val_from="test"``, is not duplicated). The safetensors file holds ``A``, ``V``, ``L`` ``[N, D_m]``,
    ``speakers``, ``labels`` ``[N]`` and ``lengths`` ``[G]``; the JSON the dialogue names in storage order, the
    names of each split, utterance ids, class names, dims and ``num_speakers``. Each file is written atomically
    (temporary file + ``os.replace``), the features first and the JSON last, and both carry the same random token,
    so a reader never pairs a JSON with features from another conversion. Returns the directory.
    """
    from safetensors.torch import save as st_save

    directory = os.fspath(directory)
    first = next(iter(splits.values()))
    order: dict[str, tuple[DialogueDataset, int]] = {}
    for ds in splits.values():
        if ds.dims != first.dims or ds.class_names != first.class_names:
            raise ValueError("all splits must share dims and class names")
        for g, name in enumerate(ds.names):
            order.setdefault(name, (ds, g))
    names = list(order)
    rows = [order[n] for n in names]
    tensors: dict[str, torch.Tensor] = {}
    for j, m in enumerate(MODALITIES):
        tensors[m] = (torch.cat([ds.features[m][g] for ds, g in rows]) if rows
                      else torch.zeros(0, first.dims[j])).contiguous()
    tensors["speakers"] = torch.cat([ds.speakers[g] for ds, g in rows]).contiguous()
    tensors["labels"] = torch.cat([ds.labels[g] for ds, g in rows]).contiguous()
    tensors["lengths"] = torch.tensor([ds.labels[g].numel() for ds, g in rows], dtype=torch.int64)
    token = uuid.uuid4().hex
    utt = None
    if all(ds.utterance_names is not None for ds, _ in rows):
        utt = [ds.utterance_names[g] for ds, g in rows]
    index = {
        "format": _FORMAT, "token": token, "source": source, "dims": list(first.dims),
        "class_names": list(first.class_names), "num_speakers": max(ds.num_speakers for ds in splits.values()),
        "dialogues": names, "utterances": utt, "splits": {k: list(ds.names) for k, ds in splits.items()},
    }
    atomic_write_bytes(os.path.join(directory, _FEATURE_FILE),
                       st_save(tensors, metadata={"format": _FORMAT, "token": token}))
    atomic_write_text(os.path.join(directory, _INDEX_FILE), json.dumps(index))
    return directory


def load_dialogue_splits(
    directory: str | os.PathLike,
    *,
    val_from: str = "train",
    val_fraction: float = 0.1,
    split_seed: int = 0,
) -> dict[str, DialogueDataset]:
    """Read what :func:`save_dialogue_splits` / :func:`convert_pickle` wrote (no pickle involved).

    A converted pickle holds ``train`` and ``test`` only; ``val`` is then made as in :func:`load_iemocap_erc`
    (``val_from`` / ``val_fraction`` / ``split_seed``). A directory that already holds a ``val`` split returns it
    unless ``val_from="test"``.
    """
    from safetensors import safe_open

    directory = os.fspath(directory)
    feat_file, index_file = os.path.join(directory, _FEATURE_FILE), os.path.join(directory, _INDEX_FILE)
    for f in (feat_file, index_file):
        if not os.path.isfile(f):
            raise DataFormatError(f"{f}: file not found (expected the output of convert_pickle in {directory})")
    try:
        with open(index_file) as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataFormatError(f"{index_file}: cannot read JSON ({e})") from e
    if not isinstance(index, dict) or index.get("format") != _FORMAT:
        raise DataFormatError(f"{index_file}: not a dialogue index (format "
                              f"{index.get('format') if isinstance(index, dict) else None!r}, expected {_FORMAT!r})")
    try:
        with safe_open(feat_file, framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise DataFormatError(f"{feat_file}: cannot read safetensors ({e})") from e
    if meta.get("token") != index.get("token"):
        raise DataFormatError(f"{directory}: {_FEATURE_FILE} and {_INDEX_FILE} come from different conversions; "
                              "convert again")
    missing = [k for k in (*MODALITIES, "speakers", "labels", "lengths") if k not in t]
    if missing:
        raise DataFormatError(f"{feat_file}: missing tensors {missing}")
    lens = t["lengths"].tolist()
    names = index["dialogues"]
    if len(lens) != len(names) or sum(lens) != t["labels"].numel():
        raise DataFormatError(f"{directory}: {len(names)} dialogue names, {len(lens)} lengths summing to {sum(lens)}, "
                              f"{t['labels'].numel()} labels")
    parts = {k: list(torch.split(t[k], lens)) for k in (*MODALITIES, "speakers", "labels")}
    where = {n: g for g, n in enumerate(names)}
    utt = index.get("utterances")
    full = DialogueDataset(parts["A"], parts["V"], parts["L"], parts["speakers"], parts["labels"], names,
                           class_names=index["class_names"], num_speakers=int(index["num_speakers"]),
                           dims=ModalityDims(*index["dims"]), utterance_names=utt)
    splits = {}
    for key, members in index["splits"].items():
        unknown = [n for n in members if n not in where]
        if unknown:
            raise DataFormatError(f"{index_file}: split {key!r} names unknown dialogue {unknown[0]!r}")
        splits[key] = full.subset([where[n] for n in members])
    for key in ("train", "test"):
        if key not in splits:
            raise DataFormatError(f"{index_file}: no {key!r} split")
    return with_validation(splits["train"], splits["test"], splits.get("val"), val_from=val_from,
                     val_fraction=val_fraction, split_seed=split_seed)


def convert_pickle(src: str | os.PathLike, dst_dir: str | os.PathLike, *, kind: str | None = None,
                   check_split: str = "warn") -> str:
    """Rewrite a DialogueGCN-style pickle as ``dst_dir/features.safetensors`` + ``dst_dir/dialogues.json``.

    ``kind`` is ``"iemocap-erc"`` or ``"meld"``; by default it follows the tuple length (9 -> IEMOCAP, 10 -> MELD).
    The raw ``train`` / ``test`` split is stored (``val`` is carved at load time, so the protocol stays a load-time
    choice). Load the result with ``load_dialogue_dataset("dialogues:DST_DIR")``. Unpickling ``src`` still runs its
    code once (hence the warning): convert only files you trust, then share the converted directory.
    """
    src = os.fspath(src)
    obj = read_untrusted_pickle(src, converting=True)
    if kind is None:
        kinds = {v: k for k, v in _TUPLE_LEN.items()}
        n = len(obj) if isinstance(obj, (tuple, list)) else None
        if n not in kinds:
            raise DataFormatError(f"{src}: expected a 9-tuple (IEMOCAP) or a 10-tuple (MELD), got "
                                  f"{'%d items' % n if n is not None else type(obj).__name__}")
        kind = kinds[n]
    if kind not in _TUPLE_LEN:
        raise ValueError(f"kind must be one of {tuple(_TUPLE_LEN)}, got {kind!r}")
    names = IEMOCAP_ERC_CLASS_NAMES if kind == "iemocap-erc" else MELD_CLASS_NAMES
    train, test = _parse_dialogue_tuple(obj, src, kind, names, check_split)
    return save_dialogue_splits({"train": train, "test": test}, dst_dir, source=kind)
