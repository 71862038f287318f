"""Utterance-level multimodal datasets: the container every data source produces, batching, and caching.

Every source (the embedded synthetic generator, the MMIN-layout IEMOCAP / MSP-IMPROV loaders) returns
:class:`UtteranceDataset` objects, so models, trainers and the missing-modality wrappers in
:mod:`mmer_ext.data.protocols` never need to know where the features came from.

Design notes
------------
* Features are kept as one variable-length float32 tensor ``[T_i, D_m]`` per utterance and modality, because the
  three modalities of one utterance have different frame counts (acoustic frames, video frames, word pieces) and
  the MMIN encoders (LSTM + max-pool, TextCNN) consume the raw sequences.
* :func:`collate_utterances` zero-pads each modality to the batch maximum, batch-first, as the authors' collate
  does; unlike the authors (who report the acoustic length only) it reports all three lengths, ``[B, 3]``, so noise
  injection can leave padding untouched and length-aware encoders remain possible.
* :meth:`UtteranceDataset.save` writes a single safetensors file (features concatenated along time, plus the
  per-utterance lengths) through a temporary file in the destination directory and ``os.replace``, so a crash never
  leaves a truncated cache behind and concurrent readers see either the old or the new file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from mmer_ext._atomic import atomic_write_bytes
from mmer_ext.data.protocols import MODALITIES, condition_index
_FORMAT = "mmer_ext.UtteranceDataset/1"


class ModalityDims(NamedTuple):
    """Feature dimension of each modality, in the fixed order acoustic, visual, lexical.

    The IEMOCAP features of MMIN / IF-MMIN / NMER are ``ModalityDims(130, 342, 1024)`` (ComParE LLD + deltas,
    DenseFace, BERT-large).
    """

    A: int
    V: int
    L: int


def _as_feature_list(name: str, seqs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for i, x in enumerate(seqs):
        x = torch.as_tensor(x)
        if x.dim() != 2:
            raise ValueError(f"modality {name}: utterance {i} has shape {tuple(x.shape)}, expected [T, D]")
        out.append(x if x.dtype == torch.float32 else x.float())
    return out


class UtteranceDataset(Dataset):
    """Utterance-level multimodal dataset (acoustic, visual, lexical frame sequences + an emotion label).

    Parameters
    ----------
    A, V, L : sequence of Tensor
        Per-utterance float32 features ``[T_i, D_m]``; ``T_i`` may differ between utterances and modalities.
    labels : Tensor or sequence of int
        Class index per utterance, ``[N]``.
    names : sequence of str, optional
        Utterance ids (e.g. ``Ses01F_impro01_F000``); defaults to ``"utt_<i>"``.
    class_names : sequence of str, optional
        Human-readable class names; its length fixes ``num_classes`` when given.
    num_classes : int, optional
        Number of classes; defaults to ``len(class_names)`` or ``max(label) + 1``.
    dims : ModalityDims, optional
        Feature dimensions; inferred from the first utterance when omitted (required for an empty dataset).
    speakers, dialogues : Tensor, optional
        int64 ``[N]`` speaker and dialogue ids (dialogue-graph models need them; utterance-level models ignore them).

    Items are dicts ``{"A": [Ta, Da], "V": [Tv, Dv], "L": [Tl, Dl], "label": int, "index": i}`` plus ``"speaker"`` /
    ``"dialogue"`` ints when those arrays exist.
    """

    def __init__(
        self,
        A: Sequence[torch.Tensor],
        V: Sequence[torch.Tensor],
        L: Sequence[torch.Tensor],
        labels: torch.Tensor | Sequence[int],
        names: Sequence[str] | None = None,
        *,
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        dims: ModalityDims | Sequence[int] | None = None,
        speakers: torch.Tensor | Sequence[int] | None = None,
        dialogues: torch.Tensor | Sequence[int] | None = None,
    ) -> None:
        feats = {"A": _as_feature_list("A", A), "V": _as_feature_list("V", V), "L": _as_feature_list("L", L)}
        n = len(feats["A"])
        if len(feats["V"]) != n or len(feats["L"]) != n:
            raise ValueError(f"modalities disagree on the utterance count: A {n}, V {len(feats['V'])}, "
                             f"L {len(feats['L'])}")
        self.labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if self.labels.numel() != n:
            raise ValueError(f"{self.labels.numel()} labels for {n} utterances")
        self.names = [str(s) for s in names] if names is not None else [f"utt_{i}" for i in range(n)]
        if len(self.names) != n:
            raise ValueError(f"{len(self.names)} names for {n} utterances")
        if dims is None:
            if n == 0:
                raise ValueError("dims must be given for an empty dataset")
            dims = tuple(feats[m][0].shape[1] for m in MODALITIES)
        self.dims = ModalityDims(*(int(d) for d in dims))
        for j, m in enumerate(MODALITIES):
            for i, x in enumerate(feats[m]):
                if x.shape[1] != self.dims[j]:
                    raise ValueError(f"modality {m}: utterance {i} ({self.names[i]}) has dim {x.shape[1]}, "
                                     f"expected {self.dims[j]}")
        self.features = feats
        if class_names is not None:
            self.class_names = tuple(str(c) for c in class_names)
            if num_classes is not None and num_classes != len(self.class_names):
                raise ValueError(f"num_classes={num_classes} but {len(self.class_names)} class names")
            num_classes = len(self.class_names)
        elif num_classes is None:
            num_classes = int(self.labels.max()) + 1 if n else 0
        self.num_classes = int(num_classes)
        if class_names is None:
            self.class_names = tuple(f"class_{c}" for c in range(self.num_classes))
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}); got [{int(self.labels.min())}, "
                             f"{int(self.labels.max())}]")
        self.speakers = None if speakers is None else torch.as_tensor(speakers, dtype=torch.int64).reshape(-1)
        self.dialogues = None if dialogues is None else torch.as_tensor(dialogues, dtype=torch.int64).reshape(-1)
        for key, arr in (("speakers", self.speakers), ("dialogues", self.dialogues)):
            if arr is not None and arr.numel() != n:
                raise ValueError(f"{arr.numel()} {key} for {n} utterances")

    # -- sequence protocol ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if i < 0:
            i += len(self)
        item: dict[str, Any] = {m: self.features[m][i] for m in MODALITIES}
        item["label"] = int(self.labels[i])
        item["index"] = i
        if self.speakers is not None:
            item["speaker"] = int(self.speakers[i])
        if self.dialogues is not None:
            item["dialogue"] = int(self.dialogues[i])
        return item

    @property
    def A(self) -> list[torch.Tensor]:  # noqa: N802  (modality names are upper case everywhere)
        return self.features["A"]

    @property
    def V(self) -> list[torch.Tensor]:  # noqa: N802
        return self.features["V"]

    @property
    def L(self) -> list[torch.Tensor]:  # noqa: N802
        return self.features["L"]

    @property
    def lengths(self) -> torch.Tensor:
        """int64 ``[N, 3]``: frame count of each utterance per modality (A, V, L)."""
        n = len(self)
        out = torch.zeros(n, 3, dtype=torch.int64)
        for j, m in enumerate(MODALITIES):
            if n:
                out[:, j] = torch.tensor([x.shape[0] for x in self.features[m]], dtype=torch.int64)
        return out

    def class_counts(self) -> torch.Tensor:
        """int64 ``[num_classes]``: number of utterances per class."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def mean_features(self) -> dict[str, torch.Tensor]:
        """Time-averaged features per modality, ``{m: [N, D_m]}`` (for quick linear probes and sanity checks)."""
        out = {}
        for j, m in enumerate(MODALITIES):
            if len(self) == 0:
                out[m] = torch.zeros(0, self.dims[j])
                continue
            flat = torch.cat(self.features[m])
            lens = self.lengths[:, j]
            idx = torch.repeat_interleave(torch.arange(len(self)), lens)
            s = torch.zeros(len(self), self.dims[j]).index_add_(0, idx, flat)
            out[m] = s / lens.clamp_min(1).unsqueeze(1).to(s.dtype)
        return out

    def subset(self, indices: Sequence[int] | torch.Tensor) -> UtteranceDataset:
        """A new dataset holding the given utterances (in that order); tensors are shared, not copied."""
        idx = [int(i) for i in torch.as_tensor(indices, dtype=torch.int64).reshape(-1)]
        return UtteranceDataset(
            [self.A[i] for i in idx], [self.V[i] for i in idx], [self.L[i] for i in idx],
            self.labels[idx], [self.names[i] for i in idx],
            class_names=self.class_names, dims=self.dims,
            speakers=None if self.speakers is None else self.speakers[idx],
            dialogues=None if self.dialogues is None else self.dialogues[idx],
        )

    def __repr__(self) -> str:
        extra = "".join(f", {k}" for k in ("speakers", "dialogues") if getattr(self, k) is not None)
        return (f"UtteranceDataset(n={len(self)}, dims={tuple(self.dims)}, classes={self.class_names}"
                f"{extra})")

    # -- persistence ------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the dataset to one safetensors file, atomically (temp file in the same directory + ``os.replace``).

        Layout: ``<m>`` float32 ``[sum_i T_i, D_m]`` (utterances concatenated along time), ``<m>_lengths`` int64
        ``[N]``, ``labels``, optional ``speakers`` / ``dialogues``; names, class names and dims go in the metadata.
        """
        from safetensors.torch import save as st_save

        path = os.fspath(path)
        lens = self.lengths
        tensors: dict[str, torch.Tensor] = {"labels": self.labels.contiguous()}
        for j, m in enumerate(MODALITIES):
            feats = self.features[m]
            tensors[m] = torch.cat(feats).contiguous() if feats else torch.zeros(0, self.dims[j])
            tensors[f"{m}_lengths"] = lens[:, j].contiguous()
        if self.speakers is not None:
            tensors["speakers"] = self.speakers.clone()
        if self.dialogues is not None:
            tensors["dialogues"] = self.dialogues.clone()
        metadata = {
            "format": _FORMAT,
            "names": json.dumps(self.names),
            "class_names": json.dumps(list(self.class_names)),
            "num_classes": str(self.num_classes),
            "dims": json.dumps(list(self.dims)),
        }
        atomic_write_bytes(path, st_save(tensors, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike) -> UtteranceDataset:
        """Read a dataset written by :meth:`save`."""
        from safetensors import safe_open

        path = os.fspath(path)
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{path}: not an UtteranceDataset file (format={meta.get('format')!r})")
            t = {k: f.get_tensor(k) for k in f.keys()}
        feats = {}
        for m in MODALITIES:
            lens = t[f"{m}_lengths"].tolist()
            feats[m] = list(torch.split(t[m], lens)) if lens else []
        return cls(
            feats["A"], feats["V"], feats["L"], t["labels"], json.loads(meta["names"]),
            class_names=json.loads(meta["class_names"]), num_classes=int(meta["num_classes"]),
            dims=ModalityDims(*json.loads(meta["dims"])),
            speakers=t.get("speakers"), dialogues=t.get("dialogues"),
        )


def save_splits(splits: dict[str, UtteranceDataset], directory: str | os.PathLike) -> None:
    """Save a split dict as ``<directory>/<split>.safetensors`` (each file written atomically)."""
    for name, ds in splits.items():
        ds.save(os.path.join(os.fspath(directory), f"{name}.safetensors"))


def load_splits(
    directory: str | os.PathLike, names: Sequence[str] = ("train", "val", "test")
) -> dict[str, UtteranceDataset]:
    """Inverse of :func:`save_splits`; every file is checked like the real-data loaders check theirs."""
    from mmer_ext.data.checks import DataFormatError, check_finite, check_frames, check_ids

    out = {}
    for n in names:
        path = os.path.join(os.fspath(directory), f"{n}.safetensors")
        if not os.path.isfile(path):
            raise DataFormatError(f"{path}: file not found")
        try:
            ds = UtteranceDataset.load(path)
        except Exception as e:  # noqa: BLE001 - safetensors and the constructor raise several types
            raise DataFormatError(f"{path}: not a readable UtteranceDataset ({type(e).__name__}: {e})") from e
        for m in MODALITIES:
            for name, x in zip(ds.names, ds.features[m]):
                check_frames(x.shape[0], f"{path}: modality {m}, utterance {name!r}")
                check_finite(x, f"{path}: modality {m}, utterance {name!r}", "frame")
        out[n] = ds
    check_ids({n: ds.names for n, ds in out.items()}, os.fspath(directory), "utterance")
    return out


def split_dataset(
    ds: UtteranceDataset, fractions: Sequence[float], *, seed: int = 0, stratify: bool = True
) -> list[UtteranceDataset]:
    """Randomly partition ``ds`` into subsets with the given fractions (which must sum to 1).

    With ``stratify`` each class is split in the same proportions, so small validation sets keep the class
    imbalance of the whole set (UA is sensitive to it). Deterministic for ``seed``.
    """
    fr = torch.tensor([float(f) for f in fractions], dtype=torch.float64)
    if (fr < 0).any() or abs(float(fr.sum()) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {list(fractions)}")
    g = torch.Generator().manual_seed(seed)
    groups = [torch.arange(len(ds))]
    if stratify:
        groups = [torch.nonzero(ds.labels == c).flatten() for c in range(ds.num_classes)]
    parts: list[list[torch.Tensor]] = [[] for _ in fractions]
    for grp in groups:
        perm = grp[torch.randperm(grp.numel(), generator=g)]
        bounds = torch.round(torch.cumsum(fr, 0) * grp.numel()).to(torch.int64).tolist()
        start = 0
        for k, stop in enumerate(bounds):
            parts[k].append(perm[start:stop])
            start = stop
    return [ds.subset(torch.sort(torch.cat(p)).values if p else torch.zeros(0, dtype=torch.int64)) for p in parts]


_PASS_INT_KEYS = ("speaker", "dialogue")


def collate_utterances(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Batch utterance items: zero-pad each modality to the batch maximum length (batch-first).

    Returns
    -------
    dict
        ``"A"``, ``"V"``, ``"L"``: float32 ``[B, Tmax_m, D_m]``; ``"lengths"``: int64 ``[B, 3]`` (A, V, L);
        ``"label"``, ``"index"``: int64 ``[B]``; ``"missing_index"``: int64 ``[B, 3]`` (all ones when the items carry
        none, i.e. all modalities present); ``"condition"``: int64 ``[B]`` (0..5 = missing conditions, 6 = full);
        ``"speaker"`` / ``"dialogue"`` int64 ``[B]`` when every item has them.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    b = len(items)
    batch: dict[str, torch.Tensor] = {}
    lengths = torch.empty(b, 3, dtype=torch.int64)
    for j, m in enumerate(MODALITIES):
        seqs = [it[m] for it in items]
        lengths[:, j] = torch.tensor([s.shape[0] for s in seqs], dtype=torch.int64)
        tmax = int(lengths[:, j].max())
        out = seqs[0].new_zeros(b, tmax, seqs[0].shape[1])
        for i, s in enumerate(seqs):  # a copy per item is unavoidable for ragged input; no math happens here
            out[i, : s.shape[0]] = s
        batch[m] = out
    batch["lengths"] = lengths
    batch["label"] = torch.tensor([int(it["label"]) for it in items], dtype=torch.int64)
    batch["index"] = torch.tensor([int(it.get("index", i)) for i, it in enumerate(items)], dtype=torch.int64)
    if all("missing_index" in it for it in items):
        batch["missing_index"] = torch.stack([torch.as_tensor(it["missing_index"], dtype=torch.int64) for it in items])
    else:
        batch["missing_index"] = torch.ones(b, 3, dtype=torch.int64)
    if all("condition" in it for it in items):
        batch["condition"] = torch.tensor([int(it["condition"]) for it in items], dtype=torch.int64)
    else:
        batch["condition"] = _condition_of(batch["missing_index"])
    for key in _PASS_INT_KEYS:
        if all(key in it for it in items):
            batch[key] = torch.tensor([int(it[key]) for it in items], dtype=torch.int64)
    return batch


def _condition_of(missing_index: torch.Tensor) -> torch.Tensor:
    """Condition index (0..5 missing conditions, 6 full) of each row of a ``[B, 3]`` availability mask."""
    return condition_index(missing_index)
