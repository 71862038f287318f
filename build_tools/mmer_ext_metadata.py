"""The wheel's version and torch requirement, decided at build time from the torch the build compiles against.

A compiled extension runs only with the torch major.minor it was built against (and, with CUDA kernels, the same
CUDA major), so a wheel says so in its metadata, as PyG's per-torch wheels do:

    Version: 0.1.0+pt214cu130        (CUDA kernels, built against torch 2.14 with CUDA 13.0)
    Version: 0.1.0+pt213cpu          (CPU kernels only: runs with any torch 2.13, CPU or CUDA variant)
    Requires-Dist: torch==2.14.*

The local tag names the *build's* needs, not the torch variant: a CPU-only build against a CUDA torch is ``+pt214cpu``
because it links no CUDA library and runs with ``torch 2.14.x+cpu`` too (see mmer_ext/_build.py).

scikit-build-core computes the metadata before CMake runs (and pip asks for it without building at all), so whether
the CUDA kernels will be built is predicted here with the rules of cmake/CUDASetup.cmake; CMakeLists.txt then checks
that CMake decided the same and stops the build if not. The sdist names no torch (``0.1.0``, ``torch>=<floor>``): it
is built into a wheel against whichever torch the builder has.

Configured in pyproject.toml as a ``[[tool.dynamic-metadata]]`` provider with the settings ``version`` (the release,
without local tag) and ``torch-min`` (the oldest supported torch, for the sdist).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CUDA_MODES = ("AUTO", "ON", "OFF")


def torch_major_minor(torch_version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", torch_version)
    if not m:
        raise ValueError(f"cannot read torch version {torch_version!r}")
    return int(m.group(1)), int(m.group(2))


def local_tag(torch_version: str, torch_cuda: str | None, cuda_kernels: bool) -> str:
    """``pt214cu130`` / ``pt214cpu``: torch major+minor, then the CUDA major+minor the kernels need (or ``cpu``)."""
    major, minor = torch_major_minor(torch_version)
    if cuda_kernels:
        if not torch_cuda:
            raise ValueError("CUDA kernels need a torch with CUDA")
        cuda = "cu" + "".join(torch_cuda.split(".")[:2])
    else:
        cuda = "cpu"
    return f"pt{major}{minor}{cuda}"


def torch_requirement(torch_version: str) -> str:
    major, minor = torch_major_minor(torch_version)
    return f"torch=={major}.{minor}.*"


SYSTEM_CUDA_ROOTS = ("/usr/local/cuda", "/opt/cuda")


def find_cuda_root(environ: Mapping[str, str] | None = None, system_roots: tuple[str, ...] = SYSTEM_CUDA_ROOTS,
                   ) -> Path | None:
    """The toolkit CMake would use: the same candidates, in the same order, as _mmer_find_cuda_root in
    cmake/CUDASetup.cmake (a root has bin/nvcc and include/cuda_runtime.h)."""
    environ = os.environ if environ is None else environ
    candidates = [environ[e] for e in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT") if environ.get(e)]
    candidates += list(system_roots)
    nvcc = shutil.which("nvcc", path=environ.get("PATH"))
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for c in candidates:
        root = Path(c)
        if (root / "bin" / "nvcc").exists() and (root / "include" / "cuda_runtime.h").exists():
            return root.resolve()
    return None


def nvcc_version(cuda_root: Path) -> str | None:
    try:
        out = subprocess.run([str(cuda_root / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=120, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def cuda_kernels_expected(torch_cuda: str | None, environ: Mapping[str, str] | None = None,
                          system_roots: tuple[str, ...] = SYSTEM_CUDA_ROOTS) -> bool:
    """Whether CMake will build the CUDA kernels, by cmake/CUDASetup.cmake's rules (MMER_EXT_CUDA from the
    environment, as pyproject.toml hands it to CMake)."""
    environ = os.environ if environ is None else environ
    mode = environ.get("MMER_EXT_CUDA", "AUTO").upper() or "AUTO"
    if mode not in CUDA_MODES:
        raise ValueError(f"mmer_ext: MMER_EXT_CUDA must be AUTO, ON or OFF, got {mode!r}")
    if mode == "OFF" or not torch_cuda:
        return False  # ON with a CPU-only torch is a CMake error, reported there
    if mode == "ON":
        return True
    root = find_cuda_root(environ, system_roots)
    if root is None:
        return False
    version = nvcc_version(root)
    return version is not None and version.split(".")[0] == torch_cuda.split(".")[0]


class Provider:
    """The scikit-build-core / dynamic-metadata provider (``version`` and the ``torch`` entry of ``dependencies``)."""

    def __init__(self) -> None:
        self.state = "wheel"

    def build_state(self, state: str) -> None:
        self.state = state

    def dynamic_wheel(self, settings: Mapping[str, Any]) -> dict[str, bool]:
        # The torch pin of a wheel built from the sdist depends on the builder's torch.
        return {"dependencies": True}

    def dynamic_metadata(self, settings: Mapping[str, Any], project: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(settings) - {"version", "torch-min"}
        if unknown or "version" not in settings:
            raise ValueError(f"mmer_ext_metadata takes the settings 'version' and 'torch-min', got {sorted(settings)}")
        base = settings["version"]
        if "+" in base:
            raise ValueError(f"version {base!r}: the local tag is added at build time")
        if self.state == "sdist":
            return {"version": base, "dependencies": [f"torch>={settings.get('torch-min', '0')}"]}
        import torch  # the build's torch: with --no-build-isolation the user's, else build-system.requires'

        tag = local_tag(torch.__version__, torch.version.cuda, cuda_kernels_expected(torch.version.cuda))
        return {"version": f"{base}+{tag}", "dependencies": [torch_requirement(torch.__version__)]}
