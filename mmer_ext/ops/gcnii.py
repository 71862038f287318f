"""MMGCN's deep graph convolution layer (GCNII, variant form) as one op: ``gcnii_layer``.

The kernels are C++/CUDA (``csrc/ops/gcnii/``); this module holds the typed wrapper and registers the fake kernel
(for ``torch.compile`` and meta tensors) and the autograd formula. The backward is the private op
``_gcnii_layer_backward``: one element-wise pass and four GEMMs.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from mmer_ext.ops._checks import check_dense, register_fake

__all__ = ["gcnii_layer"]

_ops = torch.ops.mmer_ext


def gcnii_layer(
    hi: Tensor,
    h0: Tensor,
    weight: Tensor,
    theta: float,
    alpha: float,
    dropout: float = 0.0,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One GCNII layer as MMGCN stacks them, with the dropout of the next layer's input, in one pass:

    ``dropout_p(relu(theta * [hi || h0] @ weight + (1 - theta) * ((1 - alpha) * hi + alpha * h0)))``

    Args:
        hi: ``[N, F]``, the propagated input ``A h`` of the layer. float32 or float64; float16 and bfloat16 too
            (element-wise maths in float32). CPU or CUDA; any strides.
        h0: ``[N, F]``, the first layer's output (the initial residual), same dtype and device.
        weight: ``[2F, F]``: rows ``:F`` multiply ``hi``, rows ``F:`` multiply ``h0`` (GCNII's ``variant=True``).
        theta: the layer's ``theta_l = log(lambda / l + 1)``; alpha: the initial-residual weight. Finite.
        dropout: drop probability in ``[0, 1)`` of inverted dropout on the output (kept values are scaled by
            ``1 / (1 - dropout)``); ``0`` in evaluation.
        generator: the generator of the input's device to draw the mask from; default: that device's default
            generator (so ``torch.manual_seed`` makes it reproducible). With ``dropout = 0`` nothing is drawn.

    Returns:
        ``[N, F]`` like ``hi``. Differentiable (first order) with respect to ``hi``, ``h0`` and ``weight``.

    Dropout mask: drawn inside the kernel from a counter-based Philox stream keyed by one 64-bit draw from the
    generator (the layout of the diffusion ops' noise): element ``i`` is kept iff its 32 random bits are at least
    ``round(dropout * 2^32)``, so the keep probability is ``1 - dropout`` within ``2^-32``. The mask depends on the
    generator state and the element index only, not on the thread count; it is never stored: the backward reads the
    output (a kept, positive pre-activation is the only way to a non-zero output), so a layer keeps ``hi``, ``h0``,
    ``weight`` and its output for the backward, as an eager ``relu`` + dropout would keep more. On CUDA the draw
    uses the generator's graph-safe Philox state (CUDA-graph capturable). The masks differ from ``F.dropout``'s
    stream; the distribution is the same.

    An explicit ``generator=`` graph-breaks under ``torch.compile`` (as for the diffusion ops); the default does not.
    """
    coefs = []
    for name, value in (("theta", theta), ("alpha", alpha), ("dropout", dropout)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"mmer_ext.gcnii_layer: {name} must be a float, got {type(value).__name__}")
        try:
            coefs.append(float(value))
        except OverflowError:  # a Python int beyond float's range
            raise ValueError(f"mmer_ext.gcnii_layer: {name} must be finite, got {value}") from None
    check_dense("mmer_ext.gcnii_layer", hi=hi, h0=h0, weight=weight)
    return _ops.gcnii_layer.default(hi, h0, weight, *coefs, generator)


def _check_fake(hi: Tensor, h0: Tensor, weight: Tensor, theta: float, alpha: float, dropout: float, op: str) -> None:
    torch._check(hi.dim() == 2, lambda: f"{op}: hi must be a 2-d tensor [nodes, features], got shape {tuple(hi.shape)}")
    torch._check(h0.shape == hi.shape, lambda: f"{op}: h0 has shape {tuple(h0.shape)} but hi has {tuple(hi.shape)}")
    f = hi.shape[1]
    torch._check(
        weight.dim() == 2 and weight.shape[0] == 2 * f and weight.shape[1] == f,
        lambda: f"{op}: weight must be [2F, F] = [{2 * f}, {f}], got shape {tuple(weight.shape)}",
    )
    torch._check(h0.dtype == hi.dtype and weight.dtype == hi.dtype, lambda: f"{op}: hi, h0 and weight need one dtype")
    torch._check(math.isfinite(theta) and math.isfinite(alpha), lambda: f"{op}: theta and alpha must be finite")
    torch._check(0.0 <= dropout < 1.0, lambda: f"{op}: dropout must be in [0, 1), got {dropout}")


@register_fake("mmer_ext::gcnii_layer")
def _gcnii_layer_fake(hi, h0, weight, theta, alpha, dropout=0.0, generator=None):
    _check_fake(hi, h0, weight, theta, alpha, dropout, "mmer_ext.gcnii_layer")
    return torch.empty_like(hi, memory_format=torch.contiguous_format)


@register_fake("mmer_ext::_gcnii_layer_backward", op_name="mmer_ext.gcnii_layer")
def _gcnii_layer_backward_fake(grad, out, hi, h0, weight, theta, alpha, dropout):
    _check_fake(hi, h0, weight, theta, alpha, dropout, "mmer_ext._gcnii_layer_backward")
    return (
        torch.empty_like(hi, memory_format=torch.contiguous_format),
        torch.empty_like(h0, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
    )


# ---- autograd ------------------------------------------------------------------------------------------------------


def _gcnii_layer_setup(ctx, inputs, output):
    hi, h0, weight, theta, alpha, dropout, _generator = inputs
    ctx.save_for_backward(output, hi, h0, weight)
    ctx.coefs = (theta, alpha, dropout)


def _gcnii_layer_backward(ctx, grad):
    out, hi, h0, weight = ctx.saved_tensors
    grad_hi, grad_h0, grad_weight = _ops._gcnii_layer_backward.default(grad, out, hi, h0, weight, *ctx.coefs)
    needs = ctx.needs_input_grad
    return (grad_hi if needs[0] else None, grad_h0 if needs[1] else None, grad_weight if needs[2] else None,
            None, None, None, None)


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(
        "mmer_ext.gcnii_layer: second derivatives are not implemented (its backward is a fused first-order pass). "
        "Use gcnii_layer_ref in mmer_ext.ops._reference for gradient penalties."
    )


torch.library.register_autograd("mmer_ext::gcnii_layer", _gcnii_layer_backward, setup_context=_gcnii_layer_setup)
# Differentiating the backward op would otherwise warn and treat its output as a constant: refuse it instead.
torch.library.register_autograd("mmer_ext::_gcnii_layer_backward", _refuse_double_backward)
