r"""Fixed-length multimodal sequences with a continuous sentiment label (MOSI / MOSEI, IMDer): the container, its
one-file safetensors format, and batching. The MMSA pickle loader is :mod:`mmer_ext.data.mmsa`, the synthetic
sequences :func:`mmer_ext.data.synthetic.make_synthetic_sequences`.

Container and batches
---------------------
:class:`SequenceDataset` holds, per modality A (acoustic), V (visual), L (lexical), one float32 tensor
``[N, T_m, D_m]`` (every sample padded to the same ``T_m``, as in the MMSA pickles; aligned data has
``T_A = T_V = T_L = 50``), a float32 label ``[N]`` (sentiment in [-3, 3]), int64 ``lengths`` ``[N, 3]`` (valid frames
per modality; ``T_m`` everywhere for aligned data), sample ids, optionally the raw sentences and, for a BERT text
encoder, the tokenised text ``text_bert`` int64 ``[N, 3, T_L]`` (input ids, attention mask, token type ids).
:func:`collate_sequences` stacks items into::

    "A", "V", "L"      float32 [B, T_m, D_m]
    "label"            float32 [B]
    "index"            int64   [B]         position of each sample in its dataset
    "lengths"          int64   [B, 3]
    "missing_index"    int64   [B, 3]      availability (A, V, L; 1 = present); all ones unless the items carry it
    "condition"        int64   [B]         0..5 the six missing conditions, 6 = full (from missing_index)
    "text_bert"        int64   [B, 3, T_L] only when the dataset has it
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from mmer_ext._atomic import atomic_write_bytes
from mmer_ext.data.checks import check_range
from mmer_ext.data.errors import DataFormatError
from mmer_ext.data.protocols import MODALITIES, condition_index
from mmer_ext.data.utterance import ModalityDims

__all__ = ["LABEL_RANGE", "SequenceDataset", "collate_sequences", "read_sequence_file"]

_FORMAT = "mmer_ext.SequenceDataset/1"

# MOSI / MOSEI sentiment is annotated on a -3 (strongly negative) ... +3 (strongly positive) scale.
LABEL_RANGE = (-3.0, 3.0)


def _as_sequences(x: Any, what: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 3:
        raise ValueError(f"{what}: expected [N, T, D], got shape {tuple(t.shape)}")
    return t if t.dtype == torch.float32 else t.to(torch.float32)


class SequenceDataset(Dataset):
    """Fixed-length multimodal sequences with a continuous label (sentiment regression, MOSI / MOSEI / synthetic).

    Parameters
    ----------
    A, V, L : Tensor or ndarray
        Features ``[N, T_m, D_m]`` (cast to float32); ``T_m`` may differ between modalities (unaligned data).
    labels : Tensor, ndarray or sequence of float
        ``[N]`` (or ``[N, 1]``) sentiment; cast to float32, must be finite.
    ids : sequence of str, optional
        Sample ids (MMSA: ``"video$_$clip"``); default ``"seq_<i>"``.
    lengths : int ``[N, 3]``, optional
        Valid frames per modality (A, V, L), in ``0..T_m``; default ``T_m`` everywhere (aligned data).
    raw_text : sequence of str, optional
        The sentences (kept for inspection; no model reads them).
    text_bert : int ``[N, 3, T_L]``, optional
        BERT input ids / attention mask / token type ids, for models that run their own text encoder.

    Items are dicts ``{"A": [T_A, D_A], "V", "L", "label": float32 0-d tensor, "index": i, "lengths": int64 [3]}``,
    plus ``"text_bert"`` ``[3, T_L]`` when the dataset has it.
    """

    num_classes = 1
    class_names = ("sentiment",)
    task = "regression"

    def __init__(
        self,
        A: Any,
        V: Any,
        L: Any,
        labels: Any,
        ids: Sequence[str] | None = None,
        *,
        lengths: Any = None,
        raw_text: Sequence[str] | None = None,
        text_bert: Any = None,
    ) -> None:
        feats = {m: _as_sequences(x, f"modality {m}") for m, x in zip(MODALITIES, (A, V, L))}
        n = feats["A"].shape[0]
        for m in MODALITIES:
            if feats[m].shape[0] != n:
                raise ValueError(f"modalities disagree on the sample count: "
                                 f"{ {k: feats[k].shape[0] for k in MODALITIES} }")
        self.features = feats
        lab = torch.as_tensor(labels)
        if not (lab.dim() == 1 or (lab.dim() == 2 and lab.shape[1] == 1)):
            raise ValueError(f"labels must be [N] or [N, 1], got shape {tuple(lab.shape)}")
        self.labels = lab.reshape(-1).to(torch.float32)
        if self.labels.numel() != n:
            raise ValueError(f"{self.labels.numel()} labels for {n} samples")
        if not bool(torch.isfinite(self.labels).all()):
            raise ValueError(f"labels hold {int((~torch.isfinite(self.labels)).sum())} non-finite values")
        self.ids = [str(s) for s in ids] if ids is not None else [f"seq_{i}" for i in range(n)]
        if len(self.ids) != n:
            raise ValueError(f"{len(self.ids)} ids for {n} samples")
        self.seq_len = tuple(int(feats[m].shape[1]) for m in MODALITIES)
        self.dims = ModalityDims(*(int(feats[m].shape[2]) for m in MODALITIES))
        if lengths is None:
            self.lengths = torch.tensor(self.seq_len, dtype=torch.int64).expand(n, 3).contiguous()
        else:
            lens = torch.as_tensor(lengths)
            if lens.shape != (n, 3):
                raise ValueError(f"lengths must be [N, 3] = [{n}, 3], got shape {tuple(lens.shape)}")
            if lens.is_floating_point() and not bool(torch.all(lens == torch.round(lens))):
                raise ValueError("lengths must be integers")
            lens = lens.to(torch.int64)
            for j, m in enumerate(MODALITIES):
                if n and (int(lens[:, j].min()) < 0 or int(lens[:, j].max()) > self.seq_len[j]):
                    raise ValueError(f"lengths of modality {m} must lie in [0, {self.seq_len[j]}], got "
                                     f"[{int(lens[:, j].min())}, {int(lens[:, j].max())}]")
            self.lengths = lens.contiguous()
        self.raw_text = None if raw_text is None else [str(s) for s in raw_text]
        if self.raw_text is not None and len(self.raw_text) != n:
            raise ValueError(f"{len(self.raw_text)} raw_text entries for {n} samples")
        self.text_bert = None
        if text_bert is not None:
            tb = torch.as_tensor(text_bert)
            if tb.dim() != 3 or tb.shape[0] != n or tb.shape[1] != 3:
                raise ValueError(f"text_bert must be [N, 3, T] with N = {n}, got shape {tuple(tb.shape)}")
            if tb.is_floating_point() and not bool(torch.all(tb == torch.round(tb))):
                raise ValueError("text_bert must hold integer token ids / masks")
            self.text_bert = tb.to(torch.int64)

    # -- sequence protocol ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        item: dict[str, Any] = {m: self.features[m][i] for m in MODALITIES}
        item["label"] = self.labels[i]
        item["index"] = i
        item["lengths"] = self.lengths[i]
        if self.text_bert is not None:
            item["text_bert"] = self.text_bert[i]
        return item

    @property
    def A(self) -> torch.Tensor:  # noqa: N802  (modality names are upper case everywhere)
        return self.features["A"]

    @property
    def V(self) -> torch.Tensor:  # noqa: N802
        return self.features["V"]

    @property
    def L(self) -> torch.Tensor:  # noqa: N802
        return self.features["L"]

    @property
    def names(self) -> list[str]:
        """The sample ids (the name :class:`~mmer_ext.data.UtteranceDataset` uses)."""
        return self.ids

    @property
    def aligned(self) -> bool:
        """True when every modality has the same length and every sample is full length."""
        return len(set(self.seq_len)) == 1 and bool((self.lengths == self.seq_len[0]).all())

    def mean_features(self) -> dict[str, torch.Tensor]:
        """Features averaged over each sample's valid frames, ``{m: [N, D_m]}`` (linear probes, sanity checks)."""
        out = {}
        for j, m in enumerate(MODALITIES):
            x = self.features[m]
            lens = self.lengths[:, j]
            valid = (torch.arange(x.shape[1]) < lens.unsqueeze(1)).to(x.dtype)
            out[m] = torch.einsum("nt,ntd->nd", valid, x) / lens.clamp_min(1).unsqueeze(1).to(x.dtype)
        return out

    def subset(self, indices: Sequence[int] | torch.Tensor) -> SequenceDataset:
        """A new dataset holding the given samples, in that order (features are copied by the indexing)."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        pick = idx.tolist()
        return SequenceDataset(
            self.A[idx], self.V[idx], self.L[idx], self.labels[idx], [self.ids[i] for i in pick],
            lengths=self.lengths[idx],
            raw_text=None if self.raw_text is None else [self.raw_text[i] for i in pick],
            text_bert=None if self.text_bert is None else self.text_bert[idx],
        )

    def without_text_bert(self) -> SequenceDataset:
        """The same dataset without ``text_bert`` (tensors shared)."""
        if self.text_bert is None:
            return self
        out = SequenceDataset.__new__(SequenceDataset)
        out.__dict__.update(self.__dict__)
        out.text_bert = None
        return out

    def __repr__(self) -> str:
        extra = "".join(f", {k}" for k in ("raw_text", "text_bert") if getattr(self, k) is not None)
        seq = self.seq_len[0] if len(set(self.seq_len)) == 1 else self.seq_len
        return (f"SequenceDataset(n={len(self)}, seq_len={seq}, dims={tuple(self.dims)}, "
                f"{'aligned' if self.aligned else 'unaligned'}{extra})")

    # -- persistence ------------------------------------------------------------------------------------------------
    def _serialise(self, extra_metadata: Mapping[str, str] | None = None) -> bytes:
        from safetensors.torch import save as st_save

        tensors = {m: self.features[m].contiguous() for m in MODALITIES}
        tensors["labels"] = self.labels.contiguous()
        tensors["lengths"] = self.lengths.contiguous()
        if self.text_bert is not None:
            tensors["text_bert"] = self.text_bert.contiguous()
        metadata = {"format": _FORMAT, "ids": json.dumps(self.ids)}
        if self.raw_text is not None:
            metadata["raw_text"] = json.dumps(self.raw_text)
        metadata.update(extra_metadata or {})
        return st_save(tensors, metadata=metadata)

    def save(self, path: str | os.PathLike) -> None:
        """Write the dataset to one safetensors file, atomically (temporary file + ``os.replace``).

        Tensors ``A``, ``V``, ``L``, ``labels``, ``lengths`` and optionally ``text_bert``; the ids and raw sentences
        go in the metadata as JSON.
        """
        atomic_write_bytes(os.fspath(path), self._serialise())

    @classmethod
    def load(cls, path: str | os.PathLike) -> SequenceDataset:
        """Read a file written by :meth:`save` (raises :class:`~mmer_ext.data.DataFormatError` on a bad file)."""
        return read_sequence_file(os.fspath(path))[0]


def read_sequence_file(path: str) -> tuple[SequenceDataset, dict[str, str]]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: file not found")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise DataFormatError(f"{path}: cannot read safetensors ({e})") from e
    if meta.get("format") != _FORMAT:
        raise DataFormatError(f"{path}: not a SequenceDataset file (format={meta.get('format')!r})")
    missing = [k for k in (*MODALITIES, "labels", "lengths") if k not in t]
    if missing:
        raise DataFormatError(f"{path}: missing tensors {missing}")
    try:
        ds = SequenceDataset(
            t["A"], t["V"], t["L"], t["labels"], json.loads(meta["ids"]), lengths=t["lengths"],
            raw_text=json.loads(meta["raw_text"]) if "raw_text" in meta else None, text_bert=t.get("text_bert"),
        )
    except (ValueError, KeyError) as e:
        raise DataFormatError(f"{path}: {e}") from e
    check_range(ds.labels, *LABEL_RANGE, f"{path}: labels")
    return ds, meta


def collate_sequences(items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack :class:`SequenceDataset` items into a batch (see the module docstring for the keys).

    Items of one dataset share ``T_m``; items of different lengths are zero-padded at the end to the batch maximum.
    ``missing_index`` is stacked when every item has one (e.g. a missing-rate wrapper), else all ones.
    """
    if not items:
        raise ValueError("cannot collate an empty list of items")
    b = len(items)
    batch: dict[str, torch.Tensor] = {}
    for m in MODALITIES:
        seqs = [torch.as_tensor(it[m]) for it in items]
        if all(s.shape == seqs[0].shape for s in seqs):
            batch[m] = torch.stack(seqs)
        else:
            tmax = max(s.shape[0] for s in seqs)
            out = seqs[0].new_zeros(b, tmax, seqs[0].shape[1])
            for i, s in enumerate(seqs):
                out[i, : s.shape[0]] = s
            batch[m] = out
    batch["label"] = torch.tensor([float(it["label"]) for it in items], dtype=torch.float32)
    batch["index"] = torch.tensor([int(it.get("index", i)) for i, it in enumerate(items)], dtype=torch.int64)
    if all("lengths" in it for it in items):
        batch["lengths"] = torch.stack([torch.as_tensor(it["lengths"], dtype=torch.int64) for it in items])
    else:
        batch["lengths"] = torch.tensor([[batch[m].shape[1] for m in MODALITIES]] * b, dtype=torch.int64)
    if all("missing_index" in it for it in items):
        batch["missing_index"] = torch.stack([torch.as_tensor(it["missing_index"], dtype=torch.int64) for it in items])
    else:
        batch["missing_index"] = torch.ones(b, 3, dtype=torch.int64)
    batch["condition"] = condition_index(batch["missing_index"])
    if all("text_bert" in it for it in items):
        batch["text_bert"] = torch.stack([torch.as_tensor(it["text_bert"], dtype=torch.int64) for it in items])
    return batch


# ======================================================================================================================
# MMSA pickles
# ======================================================================================================================
