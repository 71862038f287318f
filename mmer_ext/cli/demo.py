"""``mmer-ext demo``: the main job on the embedded synthetic data (see mmer_ext.demo)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    from mmer_ext.cli._help import HelpFormatter, config_help

    p = sub.add_parser("demo", help="train and compare every model on the embedded data; write a report",
                       formatter_class=HelpFormatter,
                       description="Train every model on the embedded synthetic data and write report.md with its "
                                   "tables and figures (the five utterance models under 3 seeds, mean ± std and paired tests; about 15 "
                                   "minutes on 2 idle CPU cores; --quick: a smoke run in minutes).",
                       epilog="examples:\n  mmer-ext demo --quick --out runs/demo-quick\n"
                              "  mmer-ext demo --models baseline mmin --device cuda\n")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data and every model; the utterance models also train under SEED+1 "
                                                   "and SEED+2 (default 0)")
    p.add_argument("--device", default="auto", help=config_help("device"))
    p.add_argument("--quick", action="store_true", help="a tiny smoke run of the whole pipeline (not a result)")
    p.add_argument("--models", nargs="+",
                   choices=("baseline", "augmented", "mmin", "ifmmin", "nmer", "mmgcn", "imder"),
                   help="a subset of the models (default all)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmer_ext.demo import DEMO_MODELS, run_demo

    run_demo(args.out, seed=args.seed, quick=args.quick, device=args.device, progress=args.progress,
             models=tuple(args.models) if args.models else DEMO_MODELS)
    return 0
