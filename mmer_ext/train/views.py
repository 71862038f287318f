"""How the trainer sees a split: utterance-level (MMIN family), dialogue-level (MMGCN) or sequence (IMDer) data.

The trainer and the evaluation are written once against three operations; the dataset type picks them:
``make(split, mode, seed)`` wraps a split in a protocol view (``"train"``: one missing condition per utterance,
redrawn every epoch; ``"train+full"``; ``"expand"``: every utterance under each of the six conditions; ``"full"``),
``collate(items)`` builds a batch, ``corrupt(batch, mode, scheduler, generator)`` zeroes or noises the missing
modalities in one vectorised call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from mmer_ext.data import MissingConditionDataset, collate_utterances, corrupt_batch
from mmer_ext.data.dialogue import DialogueConditionView, DialogueDataset, collate_dialogues, corrupt_dialogue_batch
from mmer_ext.data.sequences import SequenceDataset, collate_sequences

__all__ = ["DataViews", "views_for", "STAGE_DATA_MODES", "check_data_kind", "model_data_kind"]

# A recipe stage's `data` -> the protocol mode of its training view. Sequence data ("complete", "missing-rate") is
# used as it is: the trainer draws its missing patterns per batch from the missing-rate protocol.
STAGE_DATA_MODES = {"full": "full", "missing": "train", "missing+full": "train+full", "dialogue": "full",
                    "complete": "full", "missing-rate": "full"}

# A recipe stage's `data` -> the kind of dataset it trains on, and what a user passes as --data for each kind.
STAGE_DATA_KINDS = {"full": "utterances", "missing": "utterances", "missing+full": "utterances",
                    "dialogue": "dialogues", "complete": "sequences", "missing-rate": "sequences"}
DATA_OF_KIND = {"utterances": "utterance data (synthetic, synthetic:small, iemocap:PATH, msp:PATH or cache:DIR)",
                "dialogues": "dialogue data (synthetic-dialogue, iemocap-erc:PATH, meld:PATH or dialogues:DIR)",
                "sequences": "sentiment sequences (synthetic-mosi, synthetic-mosi-small, mmsa:PKL or mmsa-cache:DIR)"}


def model_data_kind(model: str) -> str:
    """``"utterances"``, ``"dialogues"`` or ``"sequences"``: what every stage of recipe ``model`` trains on."""
    from mmer_ext.models.recipes import RECIPES

    (kind,) = {STAGE_DATA_KINDS[s.data] for s in RECIPES[model]}
    return kind


def check_data_kind(model: str, data: str, kind: str | None) -> None:
    """Refuse ``data`` (of ``kind``; None: unknown, let the loader judge) for a model that trains on another kind,
    before any work is done, saying which data the model takes."""
    from mmer_ext.train.config import ConfigError

    want = model_data_kind(model)
    if kind is not None and kind != want:
        raise ConfigError(f"model {model!r} trains on {DATA_OF_KIND[want]}; --data {data!r} is "
                          f"{DATA_OF_KIND[kind].split(' (')[0]}")


@dataclass(frozen=True)
class DataViews:
    kind: str
    make: Callable[[Dataset, str, int], Dataset]
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    corrupt: Callable[..., dict[str, Any]]


UTTERANCES = DataViews("utterances", lambda ds, mode, seed: MissingConditionDataset(ds, mode, seed=seed),
                       collate_utterances, corrupt_batch)
DIALOGUES = DataViews("dialogues", lambda ds, mode, seed: DialogueConditionView(ds, mode, seed=seed),
                      collate_dialogues, corrupt_dialogue_batch)

# IMDer's sequences: missingness is assigned per batch by the missing-rate protocol (train/evaluation.py), and the
# missing modalities are always zeroed, so the view is the dataset itself.
SEQUENCES = DataViews("sequences", lambda ds, mode, seed: ds, collate_sequences, corrupt_batch)


def views_for(dataset: Dataset) -> DataViews:
    if isinstance(dataset, DialogueDataset):
        return DIALOGUES
    if isinstance(dataset, SequenceDataset):
        return SEQUENCES
    return UTTERANCES
