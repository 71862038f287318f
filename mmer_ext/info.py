"""What was built and what this machine offers: ``mmer_ext.build_info()`` and ``python -m mmer_ext info``."""

from __future__ import annotations

import re
from typing import Any

import torch


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a GPU of ``capability`` can run kernels built for ``arch_list`` (entries like "8.0", "9.0a",
    "12.0+PTX").

    Machine code runs on GPUs of the same major version and an equal or newer minor, family-specific ("f") code
    too; arch-specific ("a") code only on exactly its own version; PTX is compiled on load for any newer GPU.
    """
    for entry in arch_list:
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry.strip())
        if not m:
            continue
        arch = (int(m.group(1)), int(m.group(2)))
        if m.group(4) and capability >= arch:
            return True
        if m.group(3) == "a":
            if capability == arch:
                return True
        elif capability[0] == arch[0] and capability[1] >= arch[1]:
            return True
    return False


def build_info() -> dict[str, Any]:
    """How mmer_ext was built and what it can run on here."""
    from mmer_ext import _C

    info: dict[str, Any] = {
        "mmer_ext": _C.__version__,
        "torch_built_against": _C.torch_version,
        "torch_running": torch.__version__,
        "torch_cuda_built_against": _C.torch_cuda_version,
        "torch_cuda_running": torch.version.cuda,
        "cuda_kernels": bool(_C.with_cuda),
        "nvcc": _C.nvcc_version,
        "cuda_arch_list": list(_C.cuda_arch_list),
        "cxx_standard": _C.cxx_standard,
        "openmp": bool(_C.with_openmp),
        "torch_threads": torch.get_num_threads(),
        "openmp_max_threads": _C.openmp_max_threads(),
        "gpu_visible": torch.cuda.is_available(),
        "gpus": [],
    }
    if info["gpu_visible"]:
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            info["gpus"].append(
                {
                    "index": i,
                    "name": torch.cuda.get_device_name(i),
                    "capability": f"{cap[0]}.{cap[1]}",
                    "supported_by_build": info["cuda_kernels"] and arch_supported(cap, info["cuda_arch_list"]),
                }
            )
    return info


def format_build_info(info: dict[str, Any]) -> str:
    lines = [
        f"mmer_ext {info['mmer_ext']}",
        f"  torch built against : {info['torch_built_against']} (CUDA {info['torch_cuda_built_against']})",
        f"  torch running       : {info['torch_running']} (CUDA {info['torch_cuda_running']})",
        f"  CUDA kernels        : {'on' if info['cuda_kernels'] else 'off'}"
        + (f" (nvcc {info['nvcc']}, archs {';'.join(info['cuda_arch_list'])})" if info["cuda_kernels"] else ""),
        f"  C++ standard        : C++{info['cxx_standard']}",
        f"  OpenMP              : {'on' if info['openmp'] else 'off'}, torch threads {info['torch_threads']}, "
        f"OpenMP max threads {info['openmp_max_threads']}",
    ]
    if not info["gpus"]:
        lines.append("  GPU                 : none visible")
    for gpu in info["gpus"]:
        verdict = "supported by this build" if gpu["supported_by_build"] else "NOT among the built archs"
        lines.append(f"  GPU {gpu['index']}               : {gpu['name']} (sm {gpu['capability']}), {verdict}")
    return "\n".join(lines)


def broken_build_info(error: BaseException) -> dict[str, Any]:
    """What can be said without the compiled library (``mmer-ext info`` when ``import mmer_ext`` would fail)."""
    from mmer_ext._build import REBUILD_HINT, version_without_library

    info: dict[str, Any] = {
        "mmer_ext": version_without_library(),
        "library_loaded": False,
        "problem": str(error).replace(REBUILD_HINT, "").strip(),  # the hint is its own entry
        "fix": REBUILD_HINT,
        "torch_built_against": None,
        "torch_cuda_built_against": None,
        "cuda_kernels": None,
        "torch_running": torch.__version__,
        "torch_cuda_running": torch.version.cuda,
    }
    try:
        from mmer_ext import _build_info
    except ImportError:
        return info
    info.update(torch_built_against=_build_info.torch_version, torch_cuda_built_against=_build_info.torch_cuda_version,
                cuda_kernels=bool(_build_info.with_cuda))
    return info


def format_broken_build_info(info: dict[str, Any]) -> str:
    built = "unknown (no build record)" if info["torch_built_against"] is None else (
        f"{info['torch_built_against']} (CUDA {info['torch_cuda_built_against']}), CUDA kernels "
        f"{'on' if info['cuda_kernels'] else 'off'}")
    return "\n".join([
        f"mmer_ext {info['mmer_ext']}: the compiled library cannot be used",
        f"  torch built against : {built}",
        f"  torch running       : {info['torch_running']} (CUDA {info['torch_cuda_running']})",
        f"  problem             : {info['problem']}",
        f"  fix                 : {info['fix']}",
    ])
