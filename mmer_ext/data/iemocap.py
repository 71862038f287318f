"""Loaders for the real IEMOCAP / MSP-IMPROV features in the MMIN / IF-MMIN / NMER layout.

On-disk layout (as the authors' ``data/multimodal*_dataset.py`` read it)::

    <config>.json                 {"feature_root": ..., "target_root": ..., "total_cv": 10 | 12}
    feature_root/A/comparE.h5     IEMOCAP: one dataset per utterance id, float (T_a, 130)
    feature_root/A/comparE_raw.h5 MSP-IMPROV: same, unnormalised
    feature_root/A/comparE_mean_std.h5   IEMOCAP: group str(cv) -> datasets "mean" (130,), "std" (130,)
    feature_root/V/denseface.h5   (T_v, 342)
    feature_root/L/bert_large.h5  (T_l, 1024)
    target_root/<cv>/{trn,val,tst}_label.npy     IEMOCAP one-hot (N, 4); MSP-IMPROV int (N,)
    target_root/<cv>/{trn,val,tst}_int2name.npy  IEMOCAP (N, 1) bytes; MSP-IMPROV plain names

``path`` given to the loaders may be (checked in this order):

1. the config JSON itself; relative ``feature_root`` / ``target_root`` are resolved against the JSON's directory;
2. a directory holding ``config.json`` (or the authors' file name ``IEMOCAP_config.json`` / ``MSP_config.json``);
3. a directory that *is* the feature root (subdirectories ``A``, ``V``, ``L``) with the targets in ``<path>/target``.

Normalisation of the acoustic features follows the authors: ``norm_method="trn"`` subtracts the fold's training
mean and divides by its std (std 0 -> 1) from ``comparE_mean_std.h5``; ``"utt"`` standardises each utterance over
its own frames (``torch.std`` semantics, unbiased; std 0 or undefined -> 1). For MSP-IMPROV the mean/std are taken
over all frames of all utterances of ``comparE_raw.h5`` (no per-fold file exists). V and L are used raw.

The folds are speaker-independent and the split files must be used as shipped; nothing here regenerates them.
Every format problem raises :class:`DataFormatError` naming the file and what is wrong, because a silently
misread feature file produces plausible-looking but meaningless accuracies.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence

import numpy as np
import torch

from mmer_ext.data.checks import check_finite, check_frames, check_ids, one_hot_classes
from mmer_ext.data.errors import DataFormatError, warn_untrusted_pickle
from mmer_ext.data.utterance import ModalityDims, UtteranceDataset

IEMOCAP_DIMS = ModalityDims(130, 342, 1024)
IEMOCAP_CLASS_NAMES = ("happy", "angry", "sad", "neutral")
_SPLIT_ALIASES = {"trn": "trn", "train": "trn", "val": "val", "valid": "val", "dev": "val", "tst": "tst",
                  "test": "tst"}
_PUBLIC_SPLIT = {"trn": "train", "val": "val", "tst": "test"}
_CONFIG_NAMES = {"iemocap": ("config.json", "IEMOCAP_config.json"), "msp": ("config.json", "MSP_config.json")}
_TOTAL_CV = {"iemocap": 10, "msp": 12}


def _resolve(path: str | os.PathLike, kind: str) -> tuple[str, str, int]:
    """Return ``(feature_root, target_root, total_cv)`` for one of the three accepted ``path`` forms."""
    path = os.fspath(path)
    if os.path.isfile(path):
        cfg_file = path
    elif os.path.isdir(path):
        cfg_file = next((os.path.join(path, n) for n in _CONFIG_NAMES[kind] if os.path.isfile(os.path.join(path, n))),
                        None)
        if cfg_file is None:
            if all(os.path.isdir(os.path.join(path, m)) for m in ("A", "V", "L")):
                target = os.path.join(path, "target")
                if not os.path.isdir(target):
                    raise DataFormatError(f"{target}: missing target directory (feature root {path} has A/V/L)")
                return path, target, _TOTAL_CV[kind]
            raise DataFormatError(
                f"{path}: expected a config JSON, a directory with one of {_CONFIG_NAMES[kind]}, or a feature root "
                "with A/, V/, L/ and target/")
    else:
        raise DataFormatError(f"{path}: no such file or directory")
    try:
        with open(cfg_file) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataFormatError(f"{cfg_file}: cannot read config JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise DataFormatError(f"{cfg_file}: config must be a JSON object")
    for key in ("feature_root", "target_root"):
        if key not in cfg:
            raise DataFormatError(f"{cfg_file}: missing key {key!r}")
    base = os.path.dirname(os.path.abspath(cfg_file))
    roots = [os.path.normpath(os.path.join(base, os.path.expanduser(str(cfg[k])))) for k in ("feature_root",
                                                                                              "target_root")]
    try:
        total_cv = int(cfg.get("total_cv", _TOTAL_CV[kind]))
    except (TypeError, ValueError) as e:
        raise DataFormatError(f"{cfg_file}: total_cv must be an integer, got {cfg.get('total_cv')!r}") from e
    return roots[0], roots[1], total_cv


def _require(path: str) -> str:
    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: file not found")
    return path


def _npy_dtype(path: str) -> np.dtype:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            # Format 3.0 differs from 2.0 only in the header's text encoding (utf-8), which the dtype never needs.
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            _shape, _order, dtype = read(f)
    except (OSError, ValueError, EOFError) as e:
        raise DataFormatError(f"{path}: not a readable .npy file ({e})") from e
    return dtype


def _load_npy(path: str) -> np.ndarray:
    """Read a .npy without unpickling; an object array (names saved as Python objects) is a pickle, which runs
    whatever code its author put in it, so it gets the same :class:`UnsafePickleWarning` as every pickle loader."""
    _require(path)
    if _npy_dtype(path).hasobject:
        warn_untrusted_pickle(path, advice="re-save it as a bytes or str array (np.save(path, np.array(names, "
                                           "dtype='S')))")
        loader = {"allow_pickle": True}
    else:
        loader = {"allow_pickle": False}
    try:
        return np.load(path, **loader)
    except (OSError, ValueError, EOFError) as e:
        raise DataFormatError(f"{path}: cannot read .npy, truncated or damaged? ({type(e).__name__}: {e})") from e
    except Exception as e:  # noqa: BLE001 - whatever an object array's unpickling raises is this file's problem
        raise DataFormatError(f"{path}: cannot unpickle its object array ({type(e).__name__}: {e})") from e


def _decode_names(path: str) -> list[str]:
    arr = _load_npy(path)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    elif arr.ndim != 1:
        raise DataFormatError(f"{path}: names must have shape (N,) or (N, 1), got {arr.shape}")
    out = []
    for row, x in enumerate(arr.tolist()):
        if isinstance(x, (bytes, bytearray, np.bytes_)):
            x = bytes(x).decode()
        elif not isinstance(x, str):
            raise DataFormatError(f"{path}: row {row} is a {type(x).__name__}, expected an utterance id string")
        out.append(x)
    return out


def _decode_labels(path: str, num_classes: int, one_hot: bool) -> torch.Tensor:
    arr = _load_npy(path)
    if arr.dtype.kind not in "biuf":
        raise DataFormatError(f"{path}: labels must be numbers, got dtype {arr.dtype}")
    if arr.ndim == 2 and arr.shape[1] == num_classes and (one_hot or num_classes > 1):
        lab = one_hot_classes(arr, path)
    elif arr.ndim == 1 or (arr.ndim == 2 and arr.shape[1] == 1):
        if one_hot:
            raise DataFormatError(f"{path}: expected one-hot labels of shape (N, {num_classes}), got {arr.shape}")
        lab = arr.reshape(-1)
        check_finite(lab, path)
        if not np.all(np.equal(np.mod(lab, 1), 0)):
            row = int(np.flatnonzero(np.mod(lab, 1) != 0)[0])
            raise DataFormatError(f"{path}: row {row} is {lab[row]}, integer class labels expected")
    else:
        want = f"(N, {num_classes})" if one_hot else f"(N,) or (N, {num_classes})"
        raise DataFormatError(f"{path}: bad label shape {arr.shape}, expected {want}")
    lab = torch.as_tensor(np.asarray(lab, dtype=np.int64))
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
        raise DataFormatError(f"{path}: labels outside [0, {num_classes}): [{int(lab.min())}, {int(lab.max())}]")
    return lab


def _h5py():
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - h5py is installed in the supported environment
        raise ImportError("reading the IEMOCAP / MSP-IMPROV features needs h5py (pip install h5py)") from e
    return h5py


def _read_h5_features(path: str, names: Sequence[str], dim: int) -> list[torch.Tensor]:
    h5py = _h5py()
    _require(path)
    out = []
    with _open_h5(path) as f:
        for name in names:
            if name not in f:
                raise DataFormatError(f"{path}: no features for utterance {name!r}")
            node = f[name]
            if not isinstance(node, h5py.Dataset):
                raise DataFormatError(f"{path}: entry {name!r} is a group, expected a (T, {dim}) dataset")
            arr = np.asarray(_read_node(path, name, node), dtype=np.float32)
            if arr.ndim != 2 or arr.shape[1] != dim:
                raise DataFormatError(f"{path}: utterance {name!r} has shape {arr.shape}, expected (T, {dim})")
            check_frames(arr.shape[0], f"{path}: utterance {name!r}")
            check_finite(arr, f"{path}: utterance {name!r}", "frame")
            out.append(torch.from_numpy(arr))
    return out


@contextlib.contextmanager
def _open_h5(path: str):
    try:
        f = _h5py().File(path, "r")
    except OSError as e:
        raise DataFormatError(f"{path}: not a readable HDF5 file, truncated or damaged? ({e})") from e
    with f:
        yield f


def _read_node(path: str, name: str, node) -> np.ndarray:
    try:
        return node[()]
    except (OSError, RuntimeError, ValueError) as e:  # h5py's errors for a truncated or damaged dataset
        raise DataFormatError(f"{path}: cannot read {name!r}, truncated or damaged? ({e})") from e


def _fix_std(std: torch.Tensor) -> torch.Tensor:
    return torch.where((std == 0) | ~torch.isfinite(std), torch.ones_like(std), std)


def _fold_mean_std(path: str, cv: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    _require(path)
    with _open_h5(path) as f:
        if str(cv) not in f:
            raise DataFormatError(f"{path}: no group {str(cv)!r} (mean/std of fold {cv})")
        grp = f[str(cv)]
        stats = []
        for key in ("mean", "std"):
            if key not in grp:
                raise DataFormatError(f"{path}: group {str(cv)!r} has no dataset {key!r}")
            v = torch.as_tensor(np.asarray(_read_node(path, f"{cv}/{key}", grp[key]), dtype=np.float32)).reshape(-1)
            if v.numel() != dim:
                raise DataFormatError(f"{path}: {str(cv)}/{key} has {v.numel()} values, expected {dim}")
            check_finite(v, f"{path}: {str(cv)}/{key}", "feature")
            if key == "std" and bool((v < 0).any()):
                raise DataFormatError(f"{path}: {str(cv)}/std feature {int(torch.nonzero(v < 0)[0])} is negative")
            stats.append(v)
    return stats[0], _fix_std(stats[1])


def _global_mean_std(path: str, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean / std over every frame of every utterance in ``path`` (float64 accumulation, population std)."""
    h5py = _h5py()
    _require(path)
    s = np.zeros(dim, dtype=np.float64)
    ss = np.zeros(dim, dtype=np.float64)
    n = 0
    with _open_h5(path) as f:
        for name in f:
            node = f[name]
            if not isinstance(node, h5py.Dataset):
                continue
            arr = np.asarray(_read_node(path, name, node), dtype=np.float64)
            if arr.ndim != 2 or arr.shape[1] != dim:
                raise DataFormatError(f"{path}: utterance {name!r} has shape {arr.shape}, expected (T, {dim})")
            check_finite(arr, f"{path}: utterance {name!r}", "frame")
            s += arr.sum(0)
            ss += (arr * arr).sum(0)
            n += arr.shape[0]
    if n == 0:
        raise DataFormatError(f"{path}: no frames to compute the normalisation from")
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 0.0))
    return torch.as_tensor(mean, dtype=torch.float32), _fix_std(torch.as_tensor(std, dtype=torch.float32))


def _utt_norm(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 0:
        return x
    mean = x.mean(0, keepdim=True)
    std = _fix_std(x.std(0, keepdim=True)) if x.shape[0] > 1 else torch.ones_like(mean)
    return (x - mean) / std


def _load(kind: str, path, cv: int, splits: Sequence[str], norm_method: str, dims, class_names,
          ) -> dict[str, UtteranceDataset]:
    if norm_method not in ("trn", "utt"):
        raise ValueError(f"norm_method must be 'trn' or 'utt', got {norm_method!r}")
    feature_root, target_root, total_cv = _resolve(path, kind)
    dims = ModalityDims(*dims)
    if not 1 <= int(cv) <= total_cv:
        raise DataFormatError(f"fold cv={cv} out of range 1..{total_cv} ({kind}, target_root {target_root})")
    cv = int(cv)
    split_keys = []
    for s in splits:
        if s not in _SPLIT_ALIASES:
            raise ValueError(f"unknown split {s!r}; use trn/val/tst (or train/val/test)")
        split_keys.append(_SPLIT_ALIASES[s])
    num_classes = len(class_names)
    a_file = os.path.join(feature_root, "A", "comparE.h5" if kind == "iemocap" else "comparE_raw.h5")
    v_file = os.path.join(feature_root, "V", "denseface.h5")
    l_file = os.path.join(feature_root, "L", "bert_large.h5")
    for p in (a_file, v_file, l_file):
        _require(p)
    mean = std = None
    if norm_method == "trn":
        if kind == "iemocap":
            mean, std = _fold_mean_std(_require(os.path.join(feature_root, "A", "comparE_mean_std.h5")), cv, dims.A)
        else:
            mean, std = _global_mean_std(a_file, dims.A)
    out = {}
    fold_dir = os.path.join(target_root, str(cv))
    names_of = {key: _decode_names(os.path.join(fold_dir, f"{key}_int2name.npy")) for key in split_keys}
    check_ids({f"{key}_int2name.npy": names for key, names in names_of.items()}, fold_dir, "utterance")
    for key in split_keys:
        label_file = os.path.join(fold_dir, f"{key}_label.npy")
        name_file = os.path.join(fold_dir, f"{key}_int2name.npy")
        labels = _decode_labels(label_file, num_classes, one_hot=(kind == "iemocap"))
        names = names_of[key]
        if len(names) != labels.numel():
            raise DataFormatError(f"{name_file}: {len(names)} names but {label_file} has {labels.numel()} labels")
        A = _read_h5_features(a_file, names, dims.A)
        A = [(x - mean) / std for x in A] if norm_method == "trn" else [_utt_norm(x) for x in A]
        V = _read_h5_features(v_file, names, dims.V)
        L = _read_h5_features(l_file, names, dims.L)
        out[_PUBLIC_SPLIT[key]] = UtteranceDataset(A, V, L, labels, names, class_names=class_names, dims=dims)
    return out


def load_iemocap(
    path: str | os.PathLike,
    cv: int = 1,
    splits: Sequence[str] = ("trn", "val", "tst"),
    norm_method: str = "trn",
    *,
    dims: ModalityDims | Sequence[int] = IEMOCAP_DIMS,
    class_names: Sequence[str] = IEMOCAP_CLASS_NAMES,
) -> dict[str, UtteranceDataset]:
    """Load one IEMOCAP fold (1..``total_cv``, 10 folds) in the MMIN feature layout (see the module docstring).

    Parameters
    ----------
    path : path
        Config JSON, a directory holding ``config.json`` / ``IEMOCAP_config.json``, or a feature root with
        ``A/ V/ L/ target/``.
    cv : int
        Fold number, ``1..total_cv``.
    splits : sequence of str
        Among ``trn``/``val``/``tst`` (``train``/``test`` accepted).
    norm_method : {"trn", "utt"}
        Acoustic normalisation: fold training mean/std, or per utterance.
    dims : ModalityDims
        Expected feature sizes; each utterance is checked.
    class_names : sequence of str
        Column order of the one-hot labels (0 happy+excited, 1 angry, 2 sad, 3 neutral).

    Returns
    -------
    dict
        ``{"train", "val", "test"}`` (those requested) -> :class:`UtteranceDataset`; names are the utterance ids.
    """
    return _load("iemocap", path, cv, splits, norm_method, dims, tuple(class_names))


def load_msp_improv(
    path: str | os.PathLike,
    cv: int = 1,
    splits: Sequence[str] = ("trn", "val", "tst"),
    norm_method: str = "trn",
    *,
    dims: ModalityDims | Sequence[int] = IEMOCAP_DIMS,
    class_names: Sequence[str] = ("class_0", "class_1", "class_2", "class_3"),
) -> dict[str, UtteranceDataset]:
    """Load one MSP-IMPROV fold (1..``total_cv``, 12 folds) in the MMIN layout.

    As :func:`load_iemocap`, except: acoustic features come from ``A/comparE_raw.h5`` and ``norm_method="trn"``
    normalises them with the mean/std over all frames of all utterances in that file; labels are integers (a
    one-hot ``(N, C)`` array is also accepted) and names plain strings. The authors' code (MMIN, IF-MMIN) does not fix the MSP class order,
    so the class names are generic unless given.
    """
    return _load("msp", path, cv, splits, norm_method, dims, tuple(class_names))
