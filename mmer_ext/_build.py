"""The compiled library and the torch it must run against.

The build records which torch it compiled against (``_build_info.py``, written by CMake). It is read before the
shared library is loaded, so a mismatch is reported as one clear ImportError instead of an undefined-symbol
error from the dynamic loader.
"""

from __future__ import annotations

import re
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
    try:
        from mmer_ext import _C
    except (ImportError, OSError) as e:
        raise ImportError(
            f"mmer_ext could not load its compiled library ({e}). It was built against torch "
            f"{_build_info.torch_version} (CUDA {_build_info.torch_cuda_version}); torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}) is running. " + REBUILD_HINT
        ) from e
    return _C
