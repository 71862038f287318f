"""Scaled dot-product attention for small heads as one op: ``attention``.

MulT (IMDer's fusion) runs d = 32 with 8 heads, a head width of 4, over ~50 time steps; at that width the CPU flash
kernel behind ``torch.nn.functional.scaled_dot_product_attention`` spends its time in tiny GEMM calls, and attention
dropout sends it to the unfused path (the [B, H, Lq, Lk] weights in memory, a ``bernoulli_`` mask). This op keeps
the weights in registers, draws the dropout mask inside the kernel and regenerates it in the backward.

The kernels are C++/CUDA (``csrc/ops/attention/``); this module holds the typed wrapper and registers the fake
kernels. The autograd formula is registered in C++ (``csrc/ops/attention/attention_autograd.cpp``, as CMD's): MulT
calls the op 21 times per training step, and a Python autograd kernel added about a quarter of a millisecond to each
call. The backward is the private op ``_attention_backward``.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from mmer_ext.ops._checks import check_dense, register_fake

__all__ = ["attention"]

_ops = torch.ops.mmer_ext


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None = None,
    dropout: float = 0.0,
    *,
    scale: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``dropout(softmax(scale * query @ key^T, blocked where mask)) @ value`` per batch and head.

    Args:
        query: ``[B, H, Lq, D]``; float32 or float64, float16 and bfloat16 too (softmax and sums in float32).
            CPU or CUDA; any strides.
        key, value: ``[B, H, Lk, D]``, same dtype and device.
        mask: ``[Lq, Lk]`` bool, True where query ``i`` may *not* attend to key ``j`` (the boolean ``attn_mask`` of
            :class:`torch.nn.MultiheadAttention`; the negation of ``scaled_dot_product_attention``'s). A row blocked
            everywhere gives a zero output and zero gradients (SDPA gives NaN there).
        dropout: drop probability in ``[0, 1)`` of inverted dropout on the attention weights; ``0`` in evaluation.
        scale: the score scale; default ``1 / sqrt(D)``.
        generator: the generator of the inputs' device for the dropout mask; default: the device's default generator
            (``torch.manual_seed`` makes it reproducible). With ``dropout = 0`` nothing is drawn.

    Returns:
        ``[B, H, Lq, D]`` whose memory is laid out as ``[B, Lq, H, D]``, so ``out.transpose(1, 2).reshape(B, Lq,
        H * D)`` (merging the heads) is a view. Differentiable (first order) with respect to query, key and value.

    Dropout mask: drawn inside the kernel from a counter-based Philox stream keyed by one 64-bit draw from the
    generator (the layout of :func:`mmer_ext.ops.gcnii_layer`'s mask over the row-major ``[B, H, Lq, Lk]`` weights):
    weight ``e`` is kept iff its 32 random bits are at least ``round(dropout * 2^32)``. The backward regenerates it
    from the key the forward kept, so nothing of size ``Lq * Lk`` is stored. On CUDA the key and counter come from the
    generator's graph-safe Philox state (CUDA-graph capturable). The masks differ from ``F.dropout``'s stream; the
    distribution is the same.
    """
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise TypeError(f"mmer_ext.attention: dropout must be a float, got {type(dropout).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"mmer_ext.attention: scale must be a float or None, got {type(scale).__name__}")
    try:
        p = float(dropout)
        s = None if scale is None else float(scale)
    except OverflowError:  # a Python int beyond float's range
        raise ValueError(f"mmer_ext.attention: dropout must be in [0, 1) and scale finite, got dropout={dropout}, "
                         f"scale={scale}") from None
    check_dense("mmer_ext.attention", query=query, key=key, value=value, mask=mask)
    out, _lse, _rng = _ops.attention.default(query, key, value, mask, p, s, generator)
    return out


def _check_fake(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, dropout: float,
                scale: float | None, op: str) -> None:
    torch._check(query.dim() == 4, lambda: f"{op}: query must be a 4-d tensor [batch, heads, Lq, head_dim], got shape "
                 f"{tuple(query.shape)}")
    torch._check(key.dim() == 4 and key.shape[0] == query.shape[0] and key.shape[1] == query.shape[1]
                 and key.shape[3] == query.shape[3],
                 lambda: f"{op}: key must be [batch, heads, Lk, head_dim] to match query {tuple(query.shape)}, got "
                 f"shape {tuple(key.shape)}")
    torch._check(value.shape == key.shape, lambda: f"{op}: value has shape {tuple(value.shape)} but key has "
                 f"{tuple(key.shape)}")
    torch._check(key.dtype == query.dtype and value.dtype == query.dtype,
                 lambda: f"{op}: query, key and value need one dtype")
    if mask is not None:
        torch._check(mask.dtype == torch.bool, lambda: f"{op}: mask must be a bool tensor (True = blocked)")
        torch._check(mask.dim() == 2 and mask.shape[0] == query.shape[2] and mask.shape[1] == key.shape[2],
                     lambda: f"{op}: mask must be [Lq, Lk], got shape {tuple(mask.shape)}")
    torch._check(0.0 <= dropout < 1.0, lambda: f"{op}: dropout must be in [0, 1), got {dropout}")
    torch._check(scale is None or math.isfinite(scale), lambda: f"{op}: scale must be finite, got {scale}")


def _head_interleaved(like: Tensor, length) -> Tensor:
    b, h, _, d = like.shape
    return like.new_empty(b, length, h, d).transpose(1, 2)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@register_fake("mmer_ext::attention")
def _attention_fake(query, key, value, mask=None, dropout=0.0, scale=None, generator=None):
    _check_fake(query, key, value, mask, dropout, scale, "mmer_ext.attention")
    b, h, lq, _ = query.shape
    return (_head_interleaved(query, lq), query.new_empty(b, h, lq, dtype=_lse_dtype(query.dtype)),
            query.new_empty(2, dtype=torch.int64))


@register_fake("mmer_ext::_attention_backward", op_name="mmer_ext.attention")
def _attention_backward_fake(grad, query, key, value, out, lse, rng, mask, dropout, scale):
    _check_fake(query, key, value, mask, dropout, scale, "mmer_ext._attention_backward")
    return _head_interleaved(query, query.shape[2]), _head_interleaved(key, key.shape[2]), \
        _head_interleaved(value, key.shape[2])
