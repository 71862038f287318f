"""Data layer of mmer_ext. The modules, bottom to top (each imports only modules above it in this list):

* :mod:`~mmer_ext.data.errors` -- :class:`DataFormatError`, the loader warnings, the one untrusted-pickle reader;
* :mod:`~mmer_ext.data.checks` -- the format checks every loader applies;
* :mod:`~mmer_ext.data.protocols` -- missing-modality conditions, corruption, IMDer's missing rates;
* :mod:`~mmer_ext.data.utterance` -- frame sequences per utterance (MMIN family) and their safe format;
* :mod:`~mmer_ext.data.dialogue` -- dialogues (MMGCN): container, batching, missing-modality view;
* :mod:`~mmer_ext.data.sequences` -- fixed-length sentiment sequences (IMDer): container, batching, safe format;
* :mod:`~mmer_ext.data.iemocap`, :mod:`~mmer_ext.data.erc`, :mod:`~mmer_ext.data.mmsa` -- the real-data loaders
  (MMIN layout; DialogueGCN pickles + their safe format; MMSA pickles + their safe cache);
* :mod:`~mmer_ext.data.synthetic` -- the embedded synthetic utterances, dialogues and sequences;
* :mod:`~mmer_ext.data.sources` -- the ``--data`` specs: the only module that knows every loader.

Modality order is always ``("A", "V", "L")`` (acoustic, visual, lexical).
"""

from mmer_ext.data.dialogue import (
    VAL_PROTOCOLS,
    DialogueConditionView,
    DialogueDataset,
    collate_dialogues,
    corrupt_dialogue_batch,
    label_persistence,
    split_dialogues,
)
from mmer_ext.data.erc import (
    IEMOCAP_ERC_CLASS_FREQUENCIES,
    IEMOCAP_ERC_CLASS_NAMES,
    IEMOCAP_ERC_DIMS,
    MELD_CLASS_NAMES,
    MELD_DIMS,
    convert_pickle,
    load_dialogue_splits,
    load_iemocap_erc,
    load_meld,
    save_dialogue_splits,
)
from mmer_ext.data.errors import DataFormatError, NonstandardSplitWarning, UnsafePickleWarning
from mmer_ext.data.iemocap import IEMOCAP_CLASS_NAMES, IEMOCAP_DIMS, load_iemocap, load_msp_improv
from mmer_ext.data.mmsa import MMSA_SPLITS, convert_mmsa, load_mmsa, load_mmsa_cache, save_sequence_splits
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
from mmer_ext.data.sequences import SequenceDataset, collate_sequences
from mmer_ext.data.sources import data_kind, load_dataset, load_dialogue_dataset
from mmer_ext.data.synthetic import (
    CLASS_NAMES,
    SEQUENCE_PRESETS,
    calibration_report,
    make_synthetic_dialogues,
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
