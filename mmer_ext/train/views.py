"""How the trainer sees a split: utterance-level (MMIN family) or dialogue-level (MMGCN) data, under a protocol.

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

__all__ = ["DataViews", "views_for", "STAGE_DATA_MODES"]

# A recipe stage's `data` -> the protocol mode of its training view.
STAGE_DATA_MODES = {"full": "full", "missing": "train", "missing+full": "train+full", "dialogue": "full"}


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


def views_for(dataset: Dataset) -> DataViews:
    return DIALOGUES if isinstance(dataset, DialogueDataset) else UTTERANCES
