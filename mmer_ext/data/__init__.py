"""Data layer of mmer_ext: utterance datasets, the embedded synthetic dataset, real-feature loaders, and the
missing-modality protocols (conditions, per-epoch condition draws, zero / noise corruption, IMDer's missing rates);
dialogue datasets for the ERC graph model (MMGCN) in :mod:`mmer_ext.data.dialogue`; fixed-length sentiment sequences
(MOSI / MOSEI MMSA pickles and their synthetic twin, for IMDer) in :mod:`mmer_ext.data.mmsa`.

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
    data_kind,
    load_dataset,
    load_iemocap,
    load_msp_improv,
)
from mmer_ext.data.mmsa import (
    MMSA_SPLITS,
    SequenceDataset,
    collate_sequences,
    convert_mmsa,
    load_mmsa,
    load_mmsa_cache,
    save_sequence_splits,
)
from mmer_ext.data.protocols import (
    ALL_CONDITIONS,
    CONDITION_LABELS,
    CONDITION_NAMES,
    CORRUPTION_MODES,
    FULL_CONDITION,
    MISSING_CONDITIONS,
    MISSING_RATES,
    MODALITIES,
    MR_PROTOCOLS,
    PROTOCOL_MODES,
    MissingConditionDataset,
    NoiseScheduler,
    authors_batch_counts,
    condition_index,
    corrupt_batch,
    missing_rate_fractions,
    missing_rate_patterns,
    realized_missing_rate,
)
from mmer_ext.data.synthetic import (
    CLASS_NAMES,
    SEQUENCE_PRESETS,
    calibration_report,
    make_synthetic_sequences,
    make_synthetic_utterances,
    regression_calibration_report,
)
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
    "collate_utterances", "condition_index", "corrupt_batch", "data_kind", "load_dataset", "load_iemocap",
    "load_msp_improv", "load_splits", "make_synthetic_utterances", "save_splits", "split_dataset",
    "MISSING_RATES", "MMSA_SPLITS", "MR_PROTOCOLS", "SEQUENCE_PRESETS", "SequenceDataset", "collate_sequences",
    "convert_mmsa", "load_mmsa", "load_mmsa_cache", "make_synthetic_sequences", "missing_rate_fractions",
    "missing_rate_patterns", "save_sequence_splits", "realized_missing_rate", "regression_calibration_report",
    "authors_batch_counts",
]
