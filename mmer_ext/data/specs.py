"""Every ``--data`` form that :func:`mmer_ext.data.load_dataset` accepts, with the models it feeds.

One table, so the command line's help, the README and the dispatcher's tests read the same list (a test checks that
the dispatcher knows every source named here and that its "unknown source" error names nothing else).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DataSpec", "DATA_SPECS", "data_spec_help"]

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
