"""Pieces every ``bench_*.py`` shares (a plain module, not collected: the conftest collects ``bench_*.py`` only)."""

from __future__ import annotations

import torch

import mmer_ext

HAS_CUDA = torch.cuda.is_available()

# The compiled baselines: default, and on CUDA also max-autotune without CUDA graphs (the two modes).
COMPILE_MODES = {"compiled": "default", "compiled-max-autotune": "max-autotune-no-cudagraphs"}


def standard_impls(device: str) -> tuple[str, ...]:
    """Ours, the eager reference and ``torch.compile`` of it (plus max-autotune on CUDA): the usual comparison."""
    return ("ours", "eager", "compiled") + (("compiled-max-autotune",) if device == "cuda" else ())


def allow_many_recompiles() -> None:
    """Sizes x modes x compile modes x devices are separate graphs of the same code object: lift dynamo's
    recompile limit (8), and fail loudly instead of silently running eager if it is ever hit."""
    for key, value in (("recompile_limit", 64), ("accumulated_recompile_limit", 256)):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), value))
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours_cuda_skip_reason() -> str | None:
    """Why our CUDA kernels cannot run here (built without them, or not for this GPU), or None."""
    info = mmer_ext.build_info()
    if not info["cuda_kernels"]:
        return "mmer_ext was built without CUDA kernels"
    gpu = info["gpus"][torch.cuda.current_device()]
    if not gpu["supported_by_build"]:
        return f"mmer_ext was not built for {gpu['name']} (sm {gpu['capability']}; built for {info['cuda_arch_list']})"
    return None
