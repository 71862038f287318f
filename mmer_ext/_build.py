"""The compiled library and the torch it must run against.

The build records which torch it compiled against (``_build_info.py``, written by CMake). It is read before the
shared library is loaded, so a mismatch is reported as one clear ImportError instead of an undefined-symbol
error from the dynamic loader.
"""

from __future__ import annotations

import os
import re
import sys
from types import ModuleType

import torch

REBUILD_HINT = (
    "Rebuild mmer_ext against the torch you run: from its source tree, `pip install --no-build-isolation "
    "--force-reinstall --no-deps .` (or `make build`), or install the mmer_ext wheel built for this torch."
)


def _major_minor(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _cuda_major(version: str | None) -> int | None:
    if not version:
        return None
    m = re.match(r"(\d+)", version)
    return int(m.group(1)) if m else None


def compatibility_problems(
    built_torch: str,
    built_cuda: str | None,
    with_cuda_kernels: bool,
    running_torch: str,
    running_cuda: str | None,
) -> list[str]:
    """What differs between the build and the running torch, in words; empty when they match.

    torch's C++ ABI changes between minor releases, so major.minor must agree. CUDA kernels link against torch's
    CUDA libraries, so a build with CUDA kernels also needs the same CUDA major (a CPU-only build runs on either).
    """
    problems = []
    if _major_minor(built_torch) != _major_minor(running_torch):
        problems.append(f"mmer_ext was built against torch {built_torch}, but torch {running_torch} is running")
    if with_cuda_kernels and _cuda_major(built_cuda) != _cuda_major(running_cuda):
        running = f"CUDA {running_cuda}" if running_cuda else "no CUDA (a CPU-only build)"
        problems.append(f"mmer_ext's CUDA kernels were built for torch with CUDA {built_cuda}, but the running torch has {running}")
    return problems


def check_compatible(info: ModuleType, running_torch: str | None = None, running_cuda: str | None = None) -> None:
    """Raise ImportError when ``info`` (a ``_build_info`` module) does not match the running torch."""
    running_torch = torch.__version__ if running_torch is None else running_torch
    running_cuda = torch.version.cuda if running_cuda is None else running_cuda
    problems = compatibility_problems(
        info.torch_version, info.torch_cuda_version, info.with_cuda, running_torch, running_cuda
    )
    if problems:
        raise ImportError("; ".join(problems) + ". " + REBUILD_HINT)


def load_library() -> ModuleType:
    """Check the build against the running torch, then load ``mmer_ext._C`` (which registers the ops)."""
    try:
        from mmer_ext import _build_info
    except ImportError as e:
        raise ImportError(
            "mmer_ext has no compiled library next to it. If this is the source tree, install the package "
            "(`make build` or `pip install --no-build-isolation .`) and import it from outside the source "
            "directory. " + REBUILD_HINT
        ) from e
    check_compatible(_build_info)
    import importlib.util

    if importlib.util.find_spec("mmer_ext._C") is None:
        raise ImportError(
            f"mmer_ext's compiled library (_C*.so) is missing from {os.path.dirname(_build_info.__file__)}, though "
            f"its build record is there (built against torch {_build_info.torch_version}). " + REBUILD_HINT
        )
    try:
        from mmer_ext import _C
    except (ImportError, OSError) as e:
        raise ImportError(
            f"mmer_ext could not load its compiled library ({e}). It was built against torch "
            f"{_build_info.torch_version} (CUDA {_build_info.torch_cuda_version}); torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}) is running. " + REBUILD_HINT
        ) from e
    return _C


def started_as_cli(argv0: str | None = None, orig_argv: list[str] | None = None) -> bool:
    """Whether this process is the ``mmer-ext`` command (the console script, or ``python -m mmer_ext``).

    Only then may the package import without its compiled library: the command line explains the problem instead of
    a traceback. While ``-m`` imports the package, ``sys.argv[0]`` is ``"-m"``, so the module name comes from
    ``sys.orig_argv``.
    """
    argv0 = sys.argv[0] if argv0 is None and sys.argv else (argv0 or "")
    orig_argv = list(getattr(sys, "orig_argv", [])) if orig_argv is None else orig_argv
    if os.path.basename(argv0) in ("mmer-ext", "mmer-ext.exe"):
        return True
    return any(a == "-m" and b in ("mmer_ext", "mmer_ext.cli") for a, b in zip(orig_argv, orig_argv[1:]))


def version_without_library() -> str:
    """The package version when ``_C`` cannot be loaded: the build's record, else the installed metadata."""
    try:
        from mmer_ext import _build_info

        return _build_info.version
    except ImportError:
        pass
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("mmer_ext")
    except PackageNotFoundError:
        return "unknown"
