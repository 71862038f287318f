"""``mmer-ext info``: how mmer_ext was built and what this machine can run."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    from mmer_ext.cli._help import HelpFormatter

    p = sub.add_parser("info", help="how mmer_ext was built and which GPUs it can use here",
                       formatter_class=HelpFormatter,
                       description="The build (torch and CUDA it was compiled against, CUDA kernels and their "
                                   "architectures, OpenMP) and the GPUs visible here, with whether the build runs "
                                   "on them.",
                       epilog="examples:\n  mmer-ext info\n  mmer-ext info --json > build.json\n")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import mmer_ext

    if mmer_ext.load_error is not None:
        from mmer_ext.info import broken_build_info, format_broken_build_info

        report = broken_build_info(mmer_ext.load_error)
        print(json.dumps(report, indent=2) if args.json else format_broken_build_info(report))
        return 1
    from mmer_ext.info import build_info, format_build_info

    report = build_info()
    print(json.dumps(report, indent=2) if args.json else format_build_info(report))
    return 0
