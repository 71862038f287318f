"""The one module that knows every data source: the ``--data`` forms, their parsing, and the dispatch to the loaders.

:data:`DATA_SPECS` lists every form :func:`load_dataset` accepts, with the models it feeds -- one table, so the command
line's help, the README and the dispatcher's tests read the same list (a test checks that the dispatcher knows every
source named here and that its "unknown source" error names nothing else). :func:`data_kind` tells the kind of data a
spec loads without loading it. Every loader module sits below this one and knows no other source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmer_ext.data.dialogue import DialogueDataset
from mmer_ext.data.erc import load_dialogue_splits, load_iemocap_erc, load_meld
from mmer_ext.data.errors import DataFormatError
from mmer_ext.data.iemocap import load_iemocap, load_msp_improv
from mmer_ext.data.mmsa import load_mmsa, load_mmsa_cache
from mmer_ext.data.synthetic import make_synthetic_dialogues, make_synthetic_sequences, make_synthetic_utterances
from mmer_ext.data.utterance import load_splits

__all__ = ["DATA_SPECS", "DIALOGUE_SOURCES", "DataSpec", "data_kind", "data_spec_help", "load_dataset",
           "load_dialogue_dataset"]

UTTERANCE_MODELS = "baseline, augmented, mmin, ifmmin, nmer, nmer-authors, baseline-msp, mmin-msp"
DIALOGUE_MODELS = "mmgcn, mmgcn-meld, mmgcn-authors, mmgcn-meld-authors"
SEQUENCE_MODELS = "imder, imder-mosei, imder-authors"


@dataclass(frozen=True)
class DataSpec:
    form: str
    models: str
    what: str

    @property
    def source(self) -> str:
        """The part before ``:`` (and before an optional ``[``), as the dispatcher matches it."""
        return self.form.partition(":")[0].partition("[")[0]


DATA_SPECS: tuple[DataSpec, ...] = (
    DataSpec("synthetic[:PRESET]", UTTERANCE_MODELS,
             "embedded synthetic utterances; PRESET iemocap (default: IEMOCAP's dims and sizes) or small"),
    DataSpec("iemocap:PATH", UTTERANCE_MODELS, "IEMOCAP features in MMIN's layout (--fold 1-10)"),
    DataSpec("msp:PATH", UTTERANCE_MODELS, "MSP-IMPROV features in MMIN's layout (--fold 1-12)"),
    DataSpec("cache:DIR", UTTERANCE_MODELS, "your own utterance features, written by mmer_ext.data.save_splits"),
    DataSpec("synthetic-dialogue[:PRESET]", DIALOGUE_MODELS,
             "embedded synthetic dialogues; PRESET iemocap (default) or small"),
    DataSpec("iemocap-erc:PATH", DIALOGUE_MODELS, "DialogueGCN-style IEMOCAP_features.pkl (unpickles: convert it)"),
    DataSpec("meld:PATH", DIALOGUE_MODELS, "MELD_features_raw1.pkl (unpickles: convert it)"),
    DataSpec("dialogues:DIR", DIALOGUE_MODELS, "dialogues converted by `mmer-ext convert` or save_dialogue_splits"),
    DataSpec("synthetic-mosi[:PRESET]", SEQUENCE_MODELS,
             "embedded MOSI-like sentiment sequences; PRESET mosi (default) or small"),
    DataSpec("synthetic-mosi-small", SEQUENCE_MODELS, "the same, small preset"),
    DataSpec("mmsa:PKL", SEQUENCE_MODELS, "MMSA's aligned_50.pkl / unaligned_50.pkl (MOSI, MOSEI; unpickles)"),
    DataSpec("mmsa-cache:DIR", SEQUENCE_MODELS, "an MMSA pickle converted by `mmer-ext convert`"),
)


def data_spec_help(indent: int = 2) -> str:
    """The table as aligned lines, grouped by the models that take each form."""
    width = max(len(s.form) for s in DATA_SPECS)
    pad = " " * indent
    lines: list[str] = []
    for models in dict.fromkeys(s.models for s in DATA_SPECS):
        lines.append(f"{pad}for {models}:")
        lines += [f"{pad}  {s.form.ljust(width)}  {s.what}" for s in DATA_SPECS if s.models == models]
    return "\n".join(lines)


#: The dialogue sources (:class:`~mmer_ext.data.dialogue.DialogueDataset` splits, for MMGCN).
DIALOGUE_SOURCES = ("synthetic-dialogue", "iemocap-erc", "meld", "dialogues")


def load_dialogue_dataset(spec: str, *, seed: int = 0, val_from: str = "train", val_fraction: float = 0.1,
                          split_seed: int = 0, **kw: Any) -> dict[str, DialogueDataset]:
    """Load a dialogue split dict from a source string.

    ``"synthetic-dialogue"`` or ``"synthetic-dialogue:<preset>"`` (``iemocap`` / ``small``) ->
    :func:`make_synthetic_dialogues` (``seed`` seeds the generator); ``"iemocap-erc:PATH"`` ->
    :func:`load_iemocap_erc`; ``"meld:PATH"`` -> :func:`load_meld`; ``"dialogues:DIR"`` -> the safe format of
    :func:`convert_pickle`. ``val_from`` (``"train"`` or the authors' ``"test"``), ``val_fraction`` and
    ``split_seed`` set the validation split (the run seed does not move it, so runs with different seeds are
    selected on the same dialogues); other keyword arguments go to the loader.
    """
    source, _, arg = spec.partition(":")
    source = source.strip().lower()
    if source in ("synthetic-dialogue", "synthetic-dialogues"):
        if arg:
            kw = {**kw, "preset": arg}
        return make_synthetic_dialogues(seed=seed, val_from=val_from, **kw)
    if not arg:
        raise DataFormatError(f"dataset spec {spec!r} needs a path: '{source}:PATH'")
    common = dict(val_from=val_from, val_fraction=val_fraction, split_seed=split_seed)
    if source in ("iemocap-erc", "iemocap_erc"):
        return load_iemocap_erc(arg, **common, **kw)
    if source == "meld":
        return load_meld(arg, **common, **kw)
    if source == "dialogues":
        return load_dialogue_splits(arg, **common, **kw)
    raise DataFormatError(f"unknown dialogue source {source!r} in {spec!r}; expected one of {DIALOGUE_SOURCES}")



def data_kind(spec: str) -> str | None:
    """The kind of dataset ``spec`` loads -- ``"utterances"``, ``"dialogues"`` or ``"sequences"`` -- without loading
    it; None for a source :func:`load_dataset` does not know (it will say so)."""
    source = spec.partition(":")[0].strip().lower()
    if source in ("synthetic-mosi", "synthetic-mosi-small", "mmsa", "mmsa-cache"):
        return "sequences"
    if source in DIALOGUE_SOURCES or source in ("synthetic-dialogues", "iemocap_erc"):
        return "dialogues"
    if source in ("synthetic", "iemocap", "msp", "msp_improv", "msp-improv", "cache"):
        return "utterances"
    return None


def load_dataset(spec: str, *, fold: int = 1, seed: int = 0, **kw: Any) -> dict[str, Any]:
    """Load a split dict ``{"train", "val", "test"}`` from a source string.

    ``"synthetic"`` or ``"synthetic:<preset>"`` (``iemocap`` or ``small``) -> :func:`make_synthetic_utterances`;
    ``"iemocap:PATH"`` -> :func:`~mmer_ext.data.iemocap.load_iemocap`; ``"msp:PATH"`` (also ``msp_improv:`` /
    ``msp-improv:``) -> :func:`~mmer_ext.data.iemocap.load_msp_improv`; ``"cache:DIR"`` -> the
    ``{train,val,test}.safetensors`` written by :func:`~mmer_ext.data.utterance.save_splits`. ``seed`` goes to the
    generator, ``fold`` (1-based) to the real loaders; other keyword arguments go to the loader.

    Dialogue sources (:class:`~mmer_ext.data.dialogue.DialogueDataset` splits, for MMGCN) go to
    :func:`load_dialogue_dataset`: ``"synthetic-dialogue[:preset]"``, ``"iemocap-erc:PATH"``,
    ``"meld:PATH"``, ``"dialogues:DIR"`` (``fold`` is ignored: these datasets have one fixed split).

    Sentiment sequences (:class:`~mmer_ext.data.sequences.SequenceDataset` splits, for IMDer): ``"synthetic-mosi"``
    (also ``"synthetic-mosi:small"``) and ``"synthetic-mosi-small"`` -> :func:`make_synthetic_sequences` with the
    ``mosi`` / ``small`` preset (``seed`` seeds the generator); ``"mmsa:PKL"`` -> :func:`~mmer_ext.data.mmsa.load_mmsa`
    (``aligned_50.pkl`` / ``unaligned_50.pkl``; unpickles, with a warning); ``"mmsa-cache:DIR"`` -> the safe copy
    written by :func:`~mmer_ext.data.mmsa.convert_mmsa`. ``fold`` and, for the files, ``seed`` are ignored.
    """
    source, _, arg = spec.partition(":")
    source = source.strip().lower()
    if source in ("synthetic-mosi", "synthetic-mosi-small"):
        preset = "small" if source.endswith("-small") else (arg or "mosi")
        if source.endswith("-small") and arg:
            raise DataFormatError(f"dataset spec {spec!r}: 'synthetic-mosi-small' takes no ':' argument")
        return make_synthetic_sequences(**{"preset": preset, **kw, "seed": seed})
    if source in ("mmsa", "mmsa-cache"):
        if not arg:
            raise DataFormatError(f"dataset spec {spec!r} needs a path: '{source}:PATH'")
        return load_mmsa(arg, **kw) if source == "mmsa" else load_mmsa_cache(arg, **kw)
    if source in DIALOGUE_SOURCES or source in ("synthetic-dialogues", "iemocap_erc"):
        return load_dialogue_dataset(spec, seed=seed, **kw)
    if source == "synthetic":
        if arg:
            kw = {**kw, "preset": arg}
        return make_synthetic_utterances(seed=seed, **kw)
    if not arg:
        raise DataFormatError(f"dataset spec {spec!r} needs a path: '{source}:PATH'")
    if source == "iemocap":
        return load_iemocap(arg, **{"cv": fold, **kw})
    if source in ("msp", "msp_improv", "msp-improv"):
        return load_msp_improv(arg, **{"cv": fold, **kw})
    if source == "cache":
        return load_splits(arg, **kw)
    raise DataFormatError(f"unknown dataset source {source!r} in {spec!r}; expected synthetic, iemocap, msp, cache, "
                          "a dialogue source (synthetic-dialogue, iemocap-erc, meld, dialogues) or a sentiment "
                          "source (synthetic-mosi, synthetic-mosi-small, mmsa, mmsa-cache)")
