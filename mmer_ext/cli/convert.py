"""``mmer-ext convert``: turn a pickled dataset into a safe format once (pickles run code when loaded), or an IMDer
checkpoint of the authors (``pretrained-mosi.pth``, ...) into a package model.

Two kinds of pickles: MMSA's ``aligned_50.pkl`` / ``unaligned_50.pkl`` (MOSI / MOSEI, a dict of splits) and the
DialogueGCN-style IEMOCAP / MELD feature tuples. ``--format auto`` tells them apart by the pickle's first opcodes
(a dict or a tuple), read with :mod:`pickletools`, which parses and never executes, so the file is unpickled only
once, by the conversion itself. A ``*.pth`` / ``*.pt`` file (``--format imder``) is the authors' IMDer state dict,
read with ``torch.load(weights_only=True)`` and written as ``DEST/model.safetensors``
(:mod:`mmer_ext.models.imder_convert`).
"""

from __future__ import annotations

import argparse
import os
import pickletools

FORMATS = ("auto", "mmsa", "dialogue", "imder")


def add_parser(sub) -> None:
    from mmer_ext.cli._help import HelpFormatter

    p = sub.add_parser("convert", help="rewrite an MMSA (MOSI / MOSEI) or DialogueGCN-style (IEMOCAP / MELD) pickle "
                                       "as safetensors + JSON",
                       description="Unpickling runs whatever code the file holds: convert only files you trust, "
                                   "once, then load and share the converted directory (--data mmsa-cache:DIR for "
                                   "MMSA pickles, --data dialogues:DIR for dialogue pickles).",
                       formatter_class=HelpFormatter,
                       epilog="examples:\n  mmer-ext convert aligned_50.pkl data/mosi && "
                              "mmer-ext train --model imder --data mmsa-cache:data/mosi\n"
                              "  mmer-ext convert IEMOCAP_features.pkl data/iemocap-erc && "
                              "mmer-ext train --model mmgcn --data dialogues:data/iemocap-erc\n")
    p.add_argument("source", help="aligned_50.pkl / unaligned_50.pkl (MMSA), IEMOCAP_features.pkl (9-tuple) or "
                                  "MELD_features_raw1.pkl (10-tuple)")
    p.add_argument("destination", help="output directory")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="input layout; auto (default): *.pth / *.pt is an IMDer checkpoint of the authors, a pickled "
                        "dict of splits is MMSA, a pickled tuple a dialogue pickle")
    p.add_argument("--kind", choices=("iemocap-erc", "meld"), help="dialogue pickles: default from the tuple length")
    p.add_argument("--text-encoder", help="IMDer checkpoints: a local BERT directory to load the checkpoint's BERT "
                                          "into (default: drop it; the model then reads that BERT's features as L)")
    p.add_argument("--dataset", choices=("mosi", "mosei"),
                   help="IMDer checkpoints: the authors' configuration to use (default: from the feature sizes)")
    p.set_defaults(func=run)


def sniff_pickle(path: str) -> str:
    """``"mmsa"`` when the pickle's top-level object is a dict, ``"dialogue"`` otherwise (parsing opcodes only)."""
    from mmer_ext.data import DataFormatError

    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: file not found")
    ops = []
    try:
        with open(path, "rb") as f:
            for op, _arg, _pos in pickletools.genops(f):
                if op.name in ("PROTO", "FRAME"):
                    continue
                ops.append(op.name)
                if len(ops) == 2:
                    break
    except Exception as e:  # noqa: BLE001 - whatever genops chokes on, the file is not a readable pickle
        if not ops:
            raise DataFormatError(f"{path}: not a pickle file ({type(e).__name__}: {e})") from e
    # A dict is built by EMPTY_DICT (protocol >= 1) or MARK DICT (protocol 0); a tuple starts with MARK and its items.
    if ops[:1] == ["EMPTY_DICT"] or ops[:2] == ["MARK", "DICT"]:
        return "mmsa"
    return "dialogue"


def _run_imder(args: argparse.Namespace) -> int:
    from mmer_ext.models.imder_convert import convert_authors_checkpoint

    out = convert_authors_checkpoint(args.source, args.destination, text_encoder=args.text_encoder,
                                     dataset=args.dataset)
    print(f"wrote {out} (the authors' IMDer, their condition mode 'shared'); evaluate it with "
          f"mmer-ext evaluate {out} --data mmsa:aligned_50.pkl")
    return 0


def run(args: argparse.Namespace) -> int:
    from mmer_ext.data import convert_mmsa, convert_pickle

    if args.format == "imder" or (args.format == "auto" and args.source.endswith((".pth", ".pt"))):
        return _run_imder(args)
    fmt = sniff_pickle(args.source) if args.format == "auto" else args.format
    if fmt == "mmsa" and args.kind is not None:
        print(f"mmer-ext convert: --kind {args.kind} applies to dialogue pickles only; ignored for an MMSA pickle")
    # The conversion unpickles the file, so it runs whatever code the file holds: say so, like every pickle loader.
    if fmt == "mmsa":
        out = convert_mmsa(args.source, args.destination)
    else:
        out = convert_pickle(args.source, args.destination, kind=args.kind)
    spec = "mmsa-cache" if fmt == "mmsa" else "dialogues"
    print(f"wrote {out}; load it with --data {spec}:{args.destination}")
    return 0
