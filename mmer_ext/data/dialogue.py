r"""Dialogue-level multimodal data for emotion recognition in conversation (MMGCN): the container, batching and the
missing-modality view. The DialogueGCN-style pickle loaders and the safe on-disk format are in
:mod:`mmer_ext.data.erc`, the synthetic dialogues in :mod:`mmer_ext.data.synthetic`.

Unlike :mod:`mmer_ext.data.utterance` (frame sequences per utterance, the MMIN family), every utterance here is one
feature *vector* per modality, and utterances are grouped into dialogues, because a dialogue-graph model connects
the utterances of one conversation.

Containers and batches
----------------------
:class:`DialogueDataset` holds, per dialogue ``g``, float32 ``[L_g, D_m]`` features of the modalities A (acoustic),
V (visual), L (lexical), int64 speakers ``[L_g]`` (an index *within the conversation's cast*: IEMOCAP's M/F roles,
MELD's 9-way one-hot position) and labels ``[L_g]``. :func:`collate_dialogues` concatenates the dialogues of a batch
along the utterance axis - the "simple batch" that MMGCN's graph code works on, without padding::

    "A", "V", "L"      float32 [N_total, D_m]   utterances of all dialogues, dialogue after dialogue
    "lengths"          int64   [G]              utterances per dialogue (sums to N_total)
    "speaker", "label" int64   [N_total]
    "missing_index"    int64   [N_total, 3]     availability (A, V, L; 1 = present); all ones for full data
    "condition"        int64   [N_total]        0..5 the six missing conditions, 6 = full
    "dialogue"         int64   [G]              index of each dialogue in its dataset

Missing modalities
------------------
:class:`DialogueConditionView` is the dialogue counterpart of :class:`~mmer_ext.data.MissingConditionDataset` with
the same modes (``"train"``, ``"train+full"``, ``"expand"``, ``"full"``) plus a fixed ``condition``: it attaches a
per-utterance ``missing_index`` / ``condition``. ``"expand"`` (the test protocol) repeats the split six times, copy
``c`` with *every* utterance of every dialogue under condition ``c``, so each condition is scored on the whole split
(MMIN's six-fold test expansion). Batches stay clean; :func:`corrupt_dialogue_batch` turns them into model input
exactly as :func:`~mmer_ext.data.corrupt_batch` does for frame sequences (zero, or NMER's gaussian / impulse
noising), keeping ``"A_clean"`` etc.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset


from mmer_ext.data.protocols import (
    ALL_CONDITIONS,
    CONDITION_NAMES,
    FULL_CONDITION,
    MODALITIES,
    PROTOCOL_MODES,
    NoiseScheduler,
    condition_index,
    corrupt_batch,
)
from mmer_ext.data.utterance import ModalityDims
from mmer_ext.seeding import derive_seed

__all__ = [
    "VAL_PROTOCOLS",
    "DialogueConditionView",
    "DialogueDataset",
    "collate_dialogues",
    "corrupt_dialogue_batch",
    "label_persistence",
    "split_dialogues",
    "with_validation",
]

VAL_PROTOCOLS = ("train", "test")



# ======================================================================================================================
# Container
# ======================================================================================================================
def _as_matrix(x: Any, what: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 2:
        raise ValueError(f"{what}: expected a [L, D] matrix, got shape {tuple(t.shape)}")
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def _as_vector(x: Any, what: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 1:
        raise ValueError(f"{what}: expected a [L] vector, got shape {tuple(t.shape)}")
    if t.is_floating_point() and not bool(torch.all(t == torch.round(t))):
        raise ValueError(f"{what}: expected integer ids")
    return t.to(torch.int64)


class DialogueDataset(Dataset):
    """Dialogues of utterance-level feature vectors (the data of MMGCN and other ERC graph models).

    Parameters
    ----------
    A, V, L : sequence of Tensor
        Per dialogue, float32 ``[L_g, D_m]``: one feature vector per utterance.
    speakers, labels : sequence of Tensor
        Per dialogue, int64 ``[L_g]``. Speaker ids index the conversation's cast (IEMOCAP: 0 = M, 1 = F; MELD: the
        position in its 9-d one-hot), which is what MMGCN's speaker embedding is indexed by.
    names : sequence of str, optional
        Dialogue ids (``Ses01F_impro01``); ``"dlg_<g>"`` by default.
    class_names : sequence of str, optional
        Fixes ``num_classes`` when given.
    num_classes, num_speakers : int, optional
        Default: ``max + 1`` of the labels / speakers (``len(class_names)`` for the classes).
    dims : ModalityDims, optional
        Required for an empty dataset; otherwise inferred and checked.
    utterance_names : sequence of sequence of str, optional
        Utterance ids per dialogue (``videoIDs`` of the pickles).

    Items are dicts ``{"A", "V", "L": [L_g, D_m], "speaker": [L_g], "label": [L_g], "dialogue": g, "index": g}``.
    """

    def __init__(
        self,
        A: Sequence[torch.Tensor],
        V: Sequence[torch.Tensor],
        L: Sequence[torch.Tensor],
        speakers: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor],
        names: Sequence[str] | None = None,
        *,
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        num_speakers: int | None = None,
        dims: ModalityDims | Sequence[int] | None = None,
        utterance_names: Sequence[Sequence[str]] | None = None,
    ) -> None:
        g = len(labels)
        feats = {}
        for m, seqs in zip(MODALITIES, (A, V, L)):
            if len(seqs) != g:
                raise ValueError(f"modality {m} has {len(seqs)} dialogues, labels have {g}")
            feats[m] = [_as_matrix(x, f"modality {m}, dialogue {k}") for k, x in enumerate(seqs)]
        if len(speakers) != g:
            raise ValueError(f"{len(speakers)} speaker sequences for {g} dialogues")
        self.labels = [_as_vector(y, f"labels of dialogue {k}") for k, y in enumerate(labels)]
        self.speakers = [_as_vector(s, f"speakers of dialogue {k}") for k, s in enumerate(speakers)]
        self.names = [str(s) for s in names] if names is not None else [f"dlg_{k}" for k in range(g)]
        if len(self.names) != g:
            raise ValueError(f"{len(self.names)} names for {g} dialogues")
        if dims is None:
            if g == 0:
                raise ValueError("dims must be given for an empty dataset")
            dims = tuple(feats[m][0].shape[1] for m in MODALITIES)
        self.dims = ModalityDims(*(int(d) for d in dims))
        for k in range(g):
            n = self.labels[k].numel()
            if n == 0:
                raise ValueError(f"dialogue {self.names[k]} has no utterances")
            if self.speakers[k].numel() != n:
                raise ValueError(f"dialogue {self.names[k]}: {self.speakers[k].numel()} speakers for {n} labels")
            for j, m in enumerate(MODALITIES):
                if tuple(feats[m][k].shape) != (n, self.dims[j]):
                    raise ValueError(f"dialogue {self.names[k]}: modality {m} has shape {tuple(feats[m][k].shape)}, "
                                     f"expected ({n}, {self.dims[j]})")
        self.features = feats
        flat_y = torch.cat(self.labels) if g else torch.zeros(0, dtype=torch.int64)
        flat_s = torch.cat(self.speakers) if g else torch.zeros(0, dtype=torch.int64)
        if class_names is not None:
            self.class_names = tuple(str(c) for c in class_names)
            if num_classes is not None and int(num_classes) != len(self.class_names):
                raise ValueError(f"num_classes={num_classes} but {len(self.class_names)} class names")
            num_classes = len(self.class_names)
        elif num_classes is None:
            num_classes = int(flat_y.max()) + 1 if g else 0
        self.num_classes = int(num_classes)
        if class_names is None:
            self.class_names = tuple(f"class_{c}" for c in range(self.num_classes))
        if g and (int(flat_y.min()) < 0 or int(flat_y.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}); got [{int(flat_y.min())}, "
                             f"{int(flat_y.max())}]")
        if num_speakers is None:
            num_speakers = int(flat_s.max()) + 1 if g else 0
        self.num_speakers = int(num_speakers)
        if g and (int(flat_s.min()) < 0 or int(flat_s.max()) >= self.num_speakers):
            raise ValueError(f"speaker ids must lie in [0, {self.num_speakers}); got [{int(flat_s.min())}, "
                             f"{int(flat_s.max())}]")
        if utterance_names is not None:
            utterance_names = [[str(u) for u in us] for us in utterance_names]
            if len(utterance_names) != g or any(len(u) != y.numel() for u, y in zip(utterance_names, self.labels)):
                raise ValueError("utterance_names must give one name per utterance of every dialogue")
        self.utterance_names = utterance_names

    # -- sequence protocol ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, g: int) -> dict[str, Any]:
        g = int(g)
        if g < 0:
            g += len(self)
        if not 0 <= g < len(self):
            raise IndexError(g)
        item: dict[str, Any] = {m: self.features[m][g] for m in MODALITIES}
        item["speaker"] = self.speakers[g]
        item["label"] = self.labels[g]
        item["dialogue"] = g
        item["index"] = g
        return item

    # -- summaries --------------------------------------------------------------------------------------------------
    @property
    def lengths(self) -> torch.Tensor:
        """int64 ``[G]``: utterances per dialogue."""
        return torch.tensor([y.numel() for y in self.labels], dtype=torch.int64)

    @property
    def num_utterances(self) -> int:
        return int(sum(y.numel() for y in self.labels))

    def flat_labels(self) -> torch.Tensor:
        """int64 ``[N]``: the labels of all utterances, dialogue after dialogue (the order of a collated batch)."""
        return torch.cat(self.labels) if len(self) else torch.zeros(0, dtype=torch.int64)

    def class_counts(self) -> torch.Tensor:
        """int64 ``[num_classes]``: utterances per class."""
        return torch.bincount(self.flat_labels(), minlength=self.num_classes)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> DialogueDataset:
        """A new dataset of the given dialogues (in that order); tensors are shared, not copied."""
        idx = [int(i) for i in torch.as_tensor(indices, dtype=torch.int64).reshape(-1)]
        return DialogueDataset(
            *([self.features[m][i] for i in idx] for m in MODALITIES),
            [self.speakers[i] for i in idx], [self.labels[i] for i in idx], [self.names[i] for i in idx],
            class_names=self.class_names, num_speakers=self.num_speakers, dims=self.dims,
            utterance_names=None if self.utterance_names is None else [self.utterance_names[i] for i in idx],
        )

    def __repr__(self) -> str:
        return (f"DialogueDataset(dialogues={len(self)}, utterances={self.num_utterances}, dims={tuple(self.dims)}, "
                f"classes={self.class_names}, num_speakers={self.num_speakers})")


def label_persistence(ds: DialogueDataset) -> dict[str, float]:
    """How much the emotion persists along the dialogues: ``same_next`` = P(y_{k+1} = y_k) over consecutive
    utterances of a dialogue, against ``chance`` = sum_c p_c^2 (the same probability for labels drawn independently
    with the dataset's class frequencies). ``same_next > chance`` is what makes context useful."""
    same, pairs = 0, 0
    for y in ds.labels:
        same += int((y[1:] == y[:-1]).sum())
        pairs += max(y.numel() - 1, 0)
    p = ds.class_counts().to(torch.float64)
    p = p / p.sum().clamp_min(1)
    return {"same_next": same / max(pairs, 1), "chance": float((p * p).sum())}


def split_dialogues(ds: DialogueDataset, fraction: float = 0.1, *, seed: int = 0
                    ) -> tuple[DialogueDataset, DialogueDataset]:
    """Seeded dialogue-level split ``(rest, held_out)`` with ``round(fraction * G)`` held-out dialogues (at least one
    and at most ``G - 1`` when ``0 < fraction < 1`` and ``G >= 2``); both keep the original dialogue order.

    Whole dialogues are held out because an utterance-level split would put the context of a validation utterance
    in the training set.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val fraction must be in [0, 1), got {fraction}")
    g = len(ds)
    k = int(round(fraction * g))
    if fraction > 0 and g >= 2:
        k = min(max(k, 1), g - 1)
    perm = torch.randperm(g, generator=torch.Generator().manual_seed(int(seed)))
    held = torch.sort(perm[:k]).values
    rest = torch.sort(perm[k:]).values
    return ds.subset(rest), ds.subset(held)


def with_validation(train: DialogueDataset, test: DialogueDataset, val: DialogueDataset | None, *, val_from: str,
              val_fraction: float, split_seed: int) -> dict[str, DialogueDataset]:
    if val_from not in VAL_PROTOCOLS:
        raise ValueError(f"val_from must be one of {VAL_PROTOCOLS}, got {val_from!r}")
    if val_from == "test":
        # The authors' protocol: no validation set, the test set picks the epoch (optimistic; for reproduction only).
        return {"train": train, "val": test, "test": test}
    if val is None:
        train, val = split_dialogues(train, val_fraction, seed=split_seed)
    return {"train": train, "val": val, "test": test}


# ======================================================================================================================
# Batching and missing modalities
# ======================================================================================================================
def collate_dialogues(items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Concatenate dialogue items into one batch (see the module docstring for the keys and shapes).

    ``missing_index`` / ``condition`` come from the items (:class:`DialogueConditionView`) as ``[L_g, 3]`` / ``[L_g]``
    (a single ``[3]`` row or int applies to the whole dialogue); without them every modality is present.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    batch: dict[str, torch.Tensor] = {m: torch.cat([it[m] for it in items]) for m in MODALITIES}
    lens = [int(torch.as_tensor(it["label"]).numel()) for it in items]
    batch["lengths"] = torch.tensor(lens, dtype=torch.int64)
    batch["speaker"] = torch.cat([torch.as_tensor(it["speaker"], dtype=torch.int64).reshape(-1) for it in items])
    batch["label"] = torch.cat([torch.as_tensor(it["label"], dtype=torch.int64).reshape(-1) for it in items])
    if all("missing_index" in it for it in items):
        mi = [torch.as_tensor(it["missing_index"], dtype=torch.int64).reshape(-1, 3).expand(n, 3)
              for it, n in zip(items, lens)]
        batch["missing_index"] = torch.cat(mi)
    else:
        batch["missing_index"] = torch.ones(sum(lens), 3, dtype=torch.int64)
    if all("condition" in it for it in items):
        batch["condition"] = torch.cat([torch.as_tensor(it["condition"], dtype=torch.int64).reshape(-1).expand(n)
                                        for it, n in zip(items, lens)])
    else:
        batch["condition"] = condition_index(batch["missing_index"])
    batch["dialogue"] = torch.tensor([int(it.get("dialogue", k)) for k, it in enumerate(items)], dtype=torch.int64)
    n = batch["label"].numel()
    for key in ("A", "V", "L", "speaker", "missing_index", "condition"):
        if batch[key].shape[0] != n:
            raise ValueError(f"collate_dialogues: {key!r} has {batch[key].shape[0]} rows for {n} utterances")
    return batch


def _condition_id(condition: int | str) -> int:
    if isinstance(condition, str):
        if condition not in CONDITION_NAMES:
            raise ValueError(f"unknown condition {condition!r}; expected one of {CONDITION_NAMES}")
        return CONDITION_NAMES.index(condition)
    c = int(condition)
    if not 0 <= c <= FULL_CONDITION:
        raise ValueError(f"condition must be in 0..{FULL_CONDITION}, got {c}")
    return c


class DialogueConditionView(Dataset):
    """Attach per-utterance availability masks to a :class:`DialogueDataset` (the dialogue counterpart of
    :class:`~mmer_ext.data.MissingConditionDataset`).

    Parameters
    ----------
    base : DialogueDataset
    mode : {"train", "train+full", "expand", "full"}
        ``train``: each utterance gets one of the six missing conditions, redrawn every epoch (:meth:`set_epoch`,
        deterministic in ``(seed, epoch)``); ``train+full``: one of the seven; ``expand``: ``6 G`` items, item ``k``
        is dialogue ``k % G`` with *every* utterance under condition ``k // G`` (the test protocol: each condition
        scores the whole split); ``full``: all present.
    condition : int or str, optional
        Every utterance of every dialogue under this one condition (0..6 or a name like ``"azl"``); overrides
        ``mode``.
    seed : int
    per : {"utterance", "dialogue"}
        Granularity of the ``train`` draws: a condition per utterance (MMIN's per-sample protocol, default) or one
        per dialogue (a modality lost for a whole conversation).
    """

    def __init__(self, base: DialogueDataset, mode: str = "full", *, condition: int | str | None = None,
                 seed: int = 0, per: str = "utterance") -> None:
        if mode not in PROTOCOL_MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {PROTOCOL_MODES}")
        if per not in ("utterance", "dialogue"):
            raise ValueError(f"per must be 'utterance' or 'dialogue', got {per!r}")
        self.base = base
        self.mode = mode if condition is None else "fixed"
        self.fixed = None if condition is None else _condition_id(condition)
        self.seed = int(seed)
        self.per = per
        self.epoch = 0
        self._g = len(base)
        lens = base.lengths
        self._offsets = (torch.cumsum(lens, 0) - lens).tolist()
        self._lens = lens.tolist()
        self._conditions: torch.Tensor | None = None  # [N] per utterance (train modes)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Redraw the ``train`` / ``train+full`` conditions for ``epoch``."""
        self.epoch = int(epoch)
        if self.mode in ("train", "train+full"):
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, scheme="splitmix"))
            high = 6 if self.mode == "train" else 7
            if self.per == "utterance":
                self._conditions = torch.randint(0, high, (self.base.num_utterances,), generator=gen)
            else:
                per_dlg = torch.randint(0, high, (self._g,), generator=gen)
                self._conditions = torch.repeat_interleave(per_dlg, self.base.lengths)

    def __len__(self) -> int:
        return 6 * self._g if self.mode == "expand" else self._g

    def _item_conditions(self, k: int) -> tuple[int, torch.Tensor]:
        if self.mode == "expand":
            g = k % self._g
            return g, torch.full((self._lens[g],), k // self._g, dtype=torch.int64)
        if self.mode in ("train", "train+full"):
            start = self._offsets[k]
            return k, self._conditions[start:start + self._lens[k]].clone()
        c = self.fixed if self.mode == "fixed" else FULL_CONDITION
        return k, torch.full((self._lens[k],), c, dtype=torch.int64)

    def __getitem__(self, k: int) -> dict[str, Any]:
        k = int(k)
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        g, cond = self._item_conditions(k)
        item = dict(self.base[g])
        item["condition"] = cond
        item["missing_index"] = ALL_CONDITIONS[cond]
        return item


def corrupt_dialogue_batch(
    batch: Mapping[str, Any],
    mode: str = "zero",
    scheduler: NoiseScheduler | None = None,
    generator: torch.Generator | None = None,
    *,
    per: str = "batch",
    occur_freq: float = 0.7,
) -> dict[str, Any]:
    """:func:`~mmer_ext.data.corrupt_batch` for dialogue batches (2-D features ``[N_total, D_m]``, no padding).

    ``zero`` multiplies each utterance's modality by its availability bit; ``gaussian`` / ``impulse`` replace a
    missing modality by ``sqrt(abar_t) x + sqrt(1 - abar_t) eps`` (one ``t`` per modality per batch as NMER, or per
    utterance with ``per="sample"``). Returns a new dict with the clean inputs kept as ``"A_clean"``, ``"V_clean"``,
    ``"L_clean"`` (and ``"noise_t"`` ``[N_total, 3]`` in the noise modes); other keys are passed through.
    """
    for m in MODALITIES:
        if batch[m].dim() != 2:
            raise ValueError(f"corrupt_dialogue_batch expects [N, D] features; {m} has shape {tuple(batch[m].shape)}")
    # One mechanism for both data kinds; "lengths" of a dialogue batch counts utterances per dialogue and is not read.
    return corrupt_batch(batch, mode, scheduler, generator, per=per, occur_freq=occur_freq)
