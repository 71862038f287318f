"""What every op test file shares: dtypes and their test ids, input layouts, the error model's epsilons, the
tolerance assertion and the CUDA-only marker.

Imported as ``from op_testing import ...``: test folders have no ``__init__.py`` (see the root conftest), so pytest
puts this folder on ``sys.path`` when it collects a test file here.
"""

from __future__ import annotations

import math

import pytest
import torch

ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

HAS_CUDA = torch.cuda.is_available()
# Marks for a CUDA-only test (``pytestmark = CUDA_ONLY`` for a whole module): the ``cuda`` keyword is what the GPU
# check selects by (tools/gpu_check_kernels.py), the skip keeps it from failing without a GPU.
CUDA_ONLY = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]


def cuda_only(f):
    """A CUDA-only test: marked ``cuda`` and skipped without a GPU."""
    for mark in reversed(CUDA_ONLY):
        f = mark(f)
    return f


# ---- in-kernel dropout ------------------------------------------------------------------------------------------


def next_cpu_key(generator: torch.Generator) -> int:
    """The 64-bit key a CPU op's in-kernel Philox dropout takes from ``generator`` on its next call (the generator's
    next random64()), read from a copy so ``generator`` itself does not advance."""
    twin = torch.Generator()
    twin.set_state(generator.get_state())
    return torch.empty((), dtype=torch.int64).random_(-(2**63), None, generator=twin).item() % 2**64


# ---- registration ----------------------------------------------------------------------------------------------


def ops_registered_from(module: str) -> set[str]:
    """Names of the ``mmer_ext::`` ops whose schemas name ``module`` as their Python module (``set_python_module``):
    an op family's ops, which its test file must all opcheck."""
    return {
        s.name.split("::")[1]
        for s in torch._C._jit_get_all_schemas()
        if s.name.startswith("mmer_ext::")
        and (torch._C._dispatch_pystub(s.name, s.overload_name) or ("",))[0] == module
    }


# ---- test ids --------------------------------------------------------------------------------------------------


def dtype_id(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


# ---- layouts ---------------------------------------------------------------------------------------------------
# Each builder returns the same values in another memory layout. The memory around a strided view is NaN, so a
# kernel that reads past the view (or ignores its strides or storage offset) returns NaN.


def _nan(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.full(shape, float("nan"), device=like.device, dtype=like.dtype)


def _last_dim_outermost(v):
    return v.movedim(-1, 0).contiguous().movedim(0, -1)


def _first_two_swapped(v):
    return v.transpose(0, 1).contiguous().transpose(0, 1)


def _last_dim_step(v):  # every other element of a wider last dim
    base = _nan((*v.shape[:-1], 2 * v.shape[-1] + 1), v)
    base[..., 1::2] = v
    return base[..., 1::2]


def _first_dim_slice(v):  # rows 3.. of a taller buffer: a storage offset
    base = _nan((v.shape[0] + 5, *v.shape[1:]), v)
    base[3 : 3 + v.shape[0]] = v
    return base[3 : 3 + v.shape[0]]


def _first_dim_step(v):
    base = _nan((2 * v.shape[0], *v.shape[1:]), v)
    base[::2] = v
    return base[::2]


def _offset_by_one(v):  # contiguous but misaligned for vector loads
    flat = _nan((v.numel() + 1,), v)
    flat[1:] = v.reshape(-1)
    return flat[1:].view(v.shape)


# Layout name -> builder. Some builders carry two names: the one each op's test ids have always used.
LAYOUT_BUILDERS = {
    "contiguous": lambda v: v,
    "transposed": _last_dim_outermost,  # the feature dim outermost in memory
    "utterance-major": _first_two_swapped,  # [N, M, D] storage of an [M, N, D] tensor
    "col_step": _last_dim_step,
    "feature-step": _last_dim_step,
    "step": _last_dim_step,
    "row_slice": _first_dim_slice,
    "row_step": _first_dim_step,
    "offset": _offset_by_one,
}


def place(values: torch.Tensor, device, dtype, layout: str) -> torch.Tensor:
    """``values`` on ``device`` as ``dtype``, in the memory layout named ``layout`` (a key of LAYOUT_BUILDERS)."""
    if layout not in LAYOUT_BUILDERS:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUT_BUILDERS)}")
    v = values.to(device=device, dtype=dtype)
    x = LAYOUT_BUILDERS[layout](v)
    assert torch.equal(x, v)
    return x


def as_float64_cpu(x: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
    """The same values in float64 on the CPU: a reference's input."""
    return x.detach().to("cpu", torch.float64).requires_grad_(requires_grad)


# ---- tolerances ------------------------------------------------------------------------------------------------
# The kernels accumulate in float32 for float32/float16/bfloat16 inputs and in float64 for float64 ("acc eps"),
# then round the result to the input dtype ("out eps"). Each op's test file builds its error model from these.


def acc_eps(dtype) -> float:
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def out_eps(dtype) -> float:
    return torch.finfo(dtype).eps


def subnormal_spacing(dtype) -> float:
    info = torch.finfo(dtype)
    return info.tiny * info.eps


def assert_within(actual: torch.Tensor, expected: torch.Tensor, tol, what: str) -> None:
    """Elementwise ``|actual - expected| <= tol`` (NaN fails), compared in float64 on the CPU; the message names the
    first bad element and the worst error / tolerance ratio."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(expected)
    err = (actual - expected).abs()
    bad = ~(err <= tol)  # NaN counts as bad
    if bad.any():
        idx = int(torch.nonzero(bad.flatten())[0]) if bad.dim() else 0
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements outside the tolerance; first at flat index {idx}: "
            f"got {actual.flatten()[idx].item()!r}, expected {expected.flatten()[idx].item()!r}, "
            f"tolerance {tol.flatten()[idx].item():.3e}; "
            f"worst error / tolerance {float((err / tol).nan_to_num(math.inf).max()):.3g}"
        )
