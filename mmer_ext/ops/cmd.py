"""Central moment discrepancy (CMD): ``central_moments``, ``cmd``, ``cmd_pairwise``.

The kernels are C++/CUDA (``csrc/ops/cmd/``); this module holds the typed wrappers and registers the fake
kernels (for ``torch.compile`` and meta tensors). Unlike the other op families, the autograd of this one is
registered in C++ (``csrc/ops/cmd/cmd_autograd.cpp``): at IF-MMIN's batch sizes a Python autograd kernel costs more
than the kernels themselves.

The public ops ``torch.ops.mmer_ext.central_moments``, ``cmd`` and ``cmd_pairwise`` are CompositeImplicitAutograd
ops (as ``layer_norm`` is over ``native_layer_norm``): they check their arguments and call
``_central_moments_forward`` / ``_cmd_pairwise_forward``, which also return the per-input statistics in float32
(float64), so the fused backward ops read those instead of passing over the inputs again, at full precision. Fake
kernels and autograd are therefore registered on the private ops, and tracing (``torch.compile``, fake tensors) sees
them in place of the composites.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mmer_ext.ops._checks import check_dense, check_int64, register_fake

__all__ = ["central_moments", "cmd", "cmd_pairwise"]

_ops = torch.ops.mmer_ext


def _clearer_error(op: str, n_moments: object, **tensors: object) -> ValueError | None:
    """The error the Python checks find in the arguments of a failed op call, or None.

    The wrappers call the op first and run these checks only when it fails, to replace the dispatcher's message
    (which names no argument for a sparse tensor or an int beyond int64) with a clear one: IF-MMIN calls
    cmd_pairwise every step on batches where the kernels take a few microseconds, so passing checks must cost nothing.
    """
    try:
        check_dense(op, **tensors)
        check_int64(op, "n_moments", n_moments)
    except ValueError as err:
        return err
    return None


def central_moments(x: Tensor, n_moments: int) -> Tensor:
    """Mean and central moments of ``x`` over its batch dimension.

    Args:
        x: ``[B, D]`` float tensor, ``B >= 1``. CUDA and CPU; float32, float64, float16 and bfloat16 (the last two
            accumulate in float32).
        n_moments: ``1 <= K <= 256``.

    Returns:
        ``[K, D]`` in ``x.dtype``: row 0 the mean over the batch, row ``k-1`` the central moment
        ``E[(x - mean)^k]`` for ``k = 2..K``. Computed in two passes about the first row, so data with a large mean
        (1e4 with unit spread) keeps full precision. Differentiable (first order).
    """
    try:
        return _ops.central_moments.default(x, n_moments)
    except (RuntimeError, TypeError):
        if (clearer := _clearer_error("mmer_ext.central_moments", n_moments, x=x)) is not None:
            raise clearer from None
        raise


def cmd(x1: Tensor, x2: Tensor, n_moments: int = 5) -> Tensor:
    """Central moment discrepancy between two batches, as MISA and IF-MMIN define it.

    ``||mean(x1) - mean(x2)||_2 + sum_{k=2..K} ||c_k(x1) - c_k(x2)||_2`` with ``c_k`` the k-th central moment over the
    batch. Unlike Zellinger et al. (2017) there is no normalisation by the feature range ``(b - a)^k``.

    Args:
        x1: ``[B1, D]`` float tensor.
        x2: ``[B2, D]`` float tensor on the same device with the same dtype; ``B2`` may differ from ``B1``.
        n_moments: ``1 <= K <= 256``.

    Returns:
        A 0-d tensor in the inputs' dtype. Where two moments are equal the gradient of their norm is taken as 0,
        so identical inputs give a loss of 0 and zero gradients (the reference code gives NaN there).
    """
    try:
        return _ops.cmd.default(x1, x2, n_moments)
    except (RuntimeError, TypeError):
        if (clearer := _clearer_error("mmer_ext.cmd", n_moments, x1=x1, x2=x2)) is not None:
            raise clearer from None
        raise


def cmd_pairwise(xs: Tensor | Sequence[Tensor], n_moments: int = 5) -> Tensor:
    """Mean of :func:`cmd` over all ``M(M-1)/2`` unordered pairs of ``xs``, computing each input's moments once.

    IF-MMIN's invariant-feature loss is ``cmd_pairwise([s_l, s_v, s_a])``: the average over (l, v), (l, a), (a, v).

    Args:
        xs: a ``[M, B, D]`` tensor, or a sequence of ``M >= 2`` tensors ``[B_i, D]`` (batch sizes may differ).
        n_moments: ``1 <= K <= 256``.
    """
    if type(xs) is list or type(xs) is tuple:
        try:
            return _ops.cmd_pairwise.default(xs, n_moments)
        except (RuntimeError, TypeError):
            if (clearer := _clearer_error("mmer_ext.cmd_pairwise", n_moments, xs=xs)) is not None:
                raise clearer from None
            raise
    if isinstance(xs, Tensor):
        if xs.dim() != 3:
            raise ValueError(
                f"mmer_ext.cmd_pairwise: xs as one tensor must be [M, B, D], got shape {tuple(xs.shape)}"
            )
        xs = list(xs.unbind(0))
    elif isinstance(xs, Sequence):
        xs = list(xs)
    else:
        raise TypeError(f"mmer_ext.cmd_pairwise: xs must be a tensor or a sequence of tensors, got {type(xs).__name__}")
    check_dense("mmer_ext.cmd_pairwise", xs=xs)
    check_int64("mmer_ext.cmd_pairwise", "n_moments", n_moments)
    return _ops.cmd_pairwise.default(xs, n_moments)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@register_fake("mmer_ext::_central_moments_forward")
def _central_moments_forward_fake(x: Tensor, n_moments: int) -> tuple[Tensor, Tensor]:
    torch._check(x.dim() == 2, lambda: f"mmer_ext.central_moments: x must be [batch, features], got {x.shape}")
    torch._check(n_moments >= 1, lambda: f"mmer_ext.central_moments: n_moments must be >= 1, got {n_moments}")
    stats = x.new_empty((n_moments + 1, x.shape[1]), dtype=_opmath(x.dtype))
    return x.new_empty((n_moments, x.shape[1])), stats


@register_fake("mmer_ext::_central_moments_backward")
def _central_moments_backward_fake(grad: Tensor, x: Tensor, stats: Tensor) -> Tensor:
    return x.new_empty(x.shape)


@register_fake("mmer_ext::_cmd_pairwise_forward")
def _cmd_pairwise_forward_fake(xs: list[Tensor], n_moments: int) -> tuple[Tensor, Tensor]:
    torch._check(len(xs) >= 2, lambda: "mmer_ext.cmd_pairwise: xs must hold at least 2 tensors")
    x = xs[0]
    stats = x.new_empty((len(xs), n_moments + 1, x.shape[1]), dtype=_opmath(x.dtype))
    return x.new_empty(()), stats


@register_fake("mmer_ext::_cmd_pairwise_backward")
def _cmd_pairwise_backward_fake(grad: Tensor, xs: list[Tensor], stats: Tensor) -> list[Tensor]:
    return [x.new_empty(x.shape) for x in xs]
