"""The ``mmer-ext`` command line (also ``python -m mmer_ext``, and ``torchrun ... -m mmer_ext train`` for DDP).

    mmer-ext train --model {baseline,augmented,mmin,ifmmin,nmer} --data synthetic|iemocap:PATH|msp:PATH [--fold N]
    mmer-ext train --model {mmin-msp,baseline-msp} --data msp:PATH --fold 1-12   (MMIN's MSP-IMPROV settings)
    mmer-ext train --model {nmer-authors,mmgcn-authors,mmgcn-meld-authors,imder-authors} ...   (the authors' code)
    mmer-ext train --model mmgcn --data synthetic-dialogue|iemocap-erc:PATH|meld:PATH|dialogues:DIR
    mmer-ext train --model imder --data synthetic-mosi|mmsa:PKL|mmsa-cache:DIR [--sampler em|pc|ode|ode-heun|ddim]
                   [--steps N] [--missing-rate MR] [--missing-protocol per-sample|per-batch]
    mmer-ext evaluate CHECKPOINT [--data ...] [--corruption zero|gaussian|impulse] [--missing-rates MR ...]
    mmer-ext demo [--out runs/demo] [--quick]
    mmer-ext convert IEMOCAP_features.pkl|aligned_50.pkl DIR
    mmer-ext info [--json]
    mmer-ext --version; mmer-ext COMMAND --help (flags, data sources, examples)
"""

from __future__ import annotations

import argparse
import sys

from mmer_ext.cli import convert, demo, evaluate, info, train

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from mmer_ext.cli._help import HelpFormatter, VersionAction

    parser = argparse.ArgumentParser(
        prog="mmer-ext", formatter_class=HelpFormatter,
        description="Multimodal emotion recognition with missing or noisy modalities: train, evaluate, the demo, "
                    "data conversion and the build report.",
        epilog="examples:\n  mmer-ext train --model mmin --data synthetic:small --epochs 2\n"
               "  mmer-ext evaluate runs/train/model.safetensors --corruption gaussian\n"
               "  mmer-ext demo --quick\n\n`mmer-ext COMMAND --help` lists a command's flags, data sources and "
               "examples.")
    parser.add_argument("--version", action=VersionAction, help="print mmer_ext's version and build, torch, CUDA "
                        "and Python, then exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    for module in (train, evaluate, demo, convert, info):
        module.add_parser(sub)
    for command in sub.choices.values():
        # Accepted after the command too (`mmer-ext train ... --debug`); SUPPRESS keeps the top-level value otherwise.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the full traceback of an error")
    for name in THREADED_COMMANDS:
        sub.choices[name].add_argument(
            "--threads", type=_positive_int, metavar="N",
            help="CPU threads for torch (default: OMP_NUM_THREADS if set, else the CPUs this process may use; 1 "
                 "when the machine is oversubscribed and OMP_WAIT_POLICY is not PASSIVE; see the README's "
                 "performance notes)")
    return parser


# The commands that compute with torch on the CPU and so get --threads and the oversubscription check.
THREADED_COMMANDS = ("train", "evaluate", "demo")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    import mmer_ext
    from mmer_ext.cli._errors import run_reported

    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if mmer_ext.load_error is not None and args.command != "info":
        # Without the compiled library only --help and `info` work (mmer_ext/__init__.py).
        print(f"mmer-ext {args.command}: error: {mmer_ext.load_error}", file=sys.stderr)
        return 2
    # Every failure is one line naming what went wrong (exit 2: fix the input, 1: the run failed); --debug re-raises.
    return run_reported(args.command, lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> int:
    if args.command in THREADED_COMMANDS:
        from mmer_ext.runtime import configure_threads

        # Inside run_reported, so the oversubscription warning is printed as the command's one-line warning.
        configure_threads(args.threads)
    return args.func(args)
