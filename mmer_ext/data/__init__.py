"""Data layer of mmer_ext: utterance datasets, the embedded synthetic dataset, real-feature loaders, and the
missing-modality protocols (conditions, per-epoch condition draws, zero / noise corruption); dialogue datasets for
the ERC graph model (MMGCN) in :mod:`mmer_ext.data.dialogue`.

Modality order is always ``("A", "V", "L")`` (acoustic, visual, lexical).
"""

from mmer_ext.data.dialogue import (
    IEMOCAP_ERC_CLASS_FREQUENCIES,
    IEMOCAP_ERC_CLASS_NAMES,
    IEMOCAP_ERC_DIMS,
    MELD_CLASS_NAMES,
    MELD_DIMS,
    VAL_PROTOCOLS,
    DialogueConditionView,
    DialogueDataset,
    NonstandardSplitWarning,
    UnsafePickleWarning,
    collate_dialogues,
    convert_pickle,
    corrupt_dialogue_batch,
    label_persistence,
    load_dialogue_dataset,
    load_dialogue_splits,
    load_iemocap_erc,
    load_meld,
    make_synthetic_dialogues,
    save_dialogue_splits,
    split_dialogues,
)
from mmer_ext.data.iemocap import (
    IEMOCAP_CLASS_NAMES,
    IEMOCAP_DIMS,
    DataFormatError,
    load_dataset,
    load_iemocap,
    load_msp_improv,
)
from mmer_ext.data.protocols import (
    ALL_CONDITIONS,
    CONDITION_LABELS,
    CONDITION_NAMES,
    CORRUPTION_MODES,
    FULL_CONDITION,
    MISSING_CONDITIONS,
    MODALITIES,
    PROTOCOL_MODES,
    MissingConditionDataset,
    NoiseScheduler,
    condition_index,
    corrupt_batch,
)
from mmer_ext.data.synthetic import CLASS_NAMES, calibration_report, make_synthetic_utterances
from mmer_ext.data.utterance import (
    ModalityDims,
    UtteranceDataset,
    collate_utterances,
    load_splits,
    save_splits,
    split_dataset,
)

__all__ = [
    "DialogueConditionView", "DialogueDataset", "IEMOCAP_ERC_CLASS_FREQUENCIES", "IEMOCAP_ERC_CLASS_NAMES",
    "IEMOCAP_ERC_DIMS", "MELD_CLASS_NAMES", "MELD_DIMS", "NonstandardSplitWarning", "UnsafePickleWarning",
    "VAL_PROTOCOLS", "collate_dialogues", "convert_pickle", "corrupt_dialogue_batch", "label_persistence",
    "load_dialogue_dataset", "load_dialogue_splits", "load_iemocap_erc", "load_meld", "make_synthetic_dialogues",
    "save_dialogue_splits", "split_dialogues",
    "ALL_CONDITIONS", "CLASS_NAMES", "CONDITION_LABELS", "CONDITION_NAMES", "CORRUPTION_MODES", "DataFormatError",
    "FULL_CONDITION", "IEMOCAP_CLASS_NAMES", "IEMOCAP_DIMS", "MISSING_CONDITIONS", "MODALITIES", "ModalityDims",
    "MissingConditionDataset", "NoiseScheduler", "PROTOCOL_MODES", "UtteranceDataset", "calibration_report",
    "collate_utterances", "condition_index", "corrupt_batch", "load_dataset", "load_iemocap", "load_msp_improv",
    "load_splits", "make_synthetic_utterances", "save_splits", "split_dataset",
]
