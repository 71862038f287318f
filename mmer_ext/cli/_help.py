"""What every subcommand's help shares: a formatter that keeps the epilog's layout, and ``--version``."""

from __future__ import annotations

import argparse
import platform


class HelpFormatter(argparse.HelpFormatter):
    """Flag help and one-paragraph descriptions are wrapped as usual; text with line breaks (the epilog's data
    sources and examples) keeps its layout."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def config_help(name: str) -> str:
    """The help text of a TrainConfig key, for the subcommands whose flag means the same (``--device``)."""
    import dataclasses

    from mmer_ext.train.config import TrainConfig

    return next(f.metadata["help"] for f in dataclasses.fields(TrainConfig) if f.name == name)


def version_text() -> str:
    """mmer_ext's version and build, the torch and CUDA it runs on, and Python: what a bug report needs first.

    Read from the build record, which loads without the compiled library, so it also answers in a broken install.
    """
    import torch

    try:
        from mmer_ext import _build_info as b

        kernels = f"CUDA kernels for {b.cuda_arch_list.replace(',', ';')}" if b.with_cuda else "CPU-only build"
        built = f"{b.version} ({kernels}; built against torch {b.torch_version})"
    except ImportError:
        from importlib.metadata import PackageNotFoundError, version

        try:
            built = f"{version('mmer_ext')} (no build record)"
        except PackageNotFoundError:
            built = "unknown (neither built nor installed)"
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
    return (f"mmer-ext {built}\n"
            f"torch {torch.__version__} ({cuda}, GPU visible: {'yes' if torch.cuda.is_available() else 'no'})\n"
            f"Python {platform.python_version()}")


class VersionAction(argparse.Action):
    """``--version``, computed only when asked (it imports torch)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())  # stdout, as argparse's own version action does
        parser.exit()
