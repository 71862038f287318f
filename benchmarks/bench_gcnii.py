"""Benchmarks of ``mmer_ext.ops.gcnii_layer`` (one MMGCN GCNII layer with the dropout after it) against the eager
formulation MMGCN used before it and ``torch.compile`` of that.

Implementations, timed in the same run:

* ``ours``: ``gcnii_layer`` (two GEMMs, then one fused pass: mixing, residual, relu, in-kernel Philox dropout; the
  backward one pass and four GEMMs, no mask kept).
* ``eager``: :func:`gcnii_layer_eager`, the layer as ``GCNIILayer`` computes it (``lerp`` + two ``addmm``) with
  ``relu`` and the ``rand_like`` dropout of ``MMGCN(dropout_rng="uniform")``.
* ``compiled``: ``torch.compile`` of that (default mode, ``dynamic=False``).

Sizes: ``iemocap`` = [2658, 100] (the nodes of benchmark ``bench_mmgcn_step``'s 16-dialogue, 3-modality batch: what
each of MMGCN's 64 layers sees), ``large`` = [65536, 128]. Dropout 0.4 (MMGCN's), float32. ``fwd+bwd`` takes
``torch.autograd.grad`` with respect to ``hi``, ``h0`` and the weight.

Correctness guard: every implementation draws its own masks, so the check reads the mask off the output (an element is
kept iff it is non-zero where the float64 reference's pre-activation is positive), requires the keep rate within 5
sigma of 0.6, and compares output and gradients with the float64 reference under that mask at float32 tolerances.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from support import COMPILE_MODES, HAS_CUDA, allow_many_recompiles, ours_cuda_skip_reason, standard_impls, sync
from mmer_ext.ops import gcnii_layer
from mmer_ext.ops._reference import gcnii_layer_ref

SIZES = {"iemocap": (2658, 100), "large": (65536, 128)}
MODES = ("fwd", "fwd+bwd")
THETA, ALPHA, DROPOUT = math.log(0.5 / 3 + 1), 0.1, 0.4

allow_many_recompiles()


def gcnii_layer_eager(hi, h0, weight, theta, alpha, dropout):
    f = hi.shape[-1]
    mix = torch.lerp(hi, h0, alpha)
    out = torch.addmm(mix, hi, weight[:f], beta=1.0 - theta, alpha=theta)
    out = torch.relu(torch.addmm(out, h0, weight[f:], alpha=theta))
    return out * torch.rand_like(out).ge_(dropout).mul_(1.0 / (1.0 - dropout))


def _cases():
    devices = [("cpu", ()), ("cuda", (pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"),))]
    for device, device_marks in devices:
        for size in SIZES:
            for mode in MODES:
                for impl in standard_impls(device):
                    yield pytest.param(device, size, mode, impl,
                                       marks=(pytest.mark.benchmark(group=f"gcnii_layer/{device}/{size}/{mode}"),
                                              *device_marks),
                                       id=f"{device}-{size}-{mode}-{impl}")


@functools.cache
def _compiled(mode: str):
    return torch.compile(gcnii_layer_eager, mode=mode, dynamic=False)


def _impl_fn(impl: str):
    if impl == "ours":
        return gcnii_layer
    if impl == "eager":
        return gcnii_layer_eager
    return _compiled(COMPILE_MODES[impl])


def make_inputs(size: str, device: str, requires_grad: bool) -> list[torch.Tensor]:
    n, f = SIZES[size]
    gen = torch.Generator().manual_seed(1234)
    hi = torch.randn(n, f, generator=gen)
    h0 = torch.randn(n, f, generator=gen).relu()
    w = (torch.rand(2 * f, f, generator=gen) * 2 - 1) / math.sqrt(f)
    return [v.to(device).requires_grad_(requires_grad) for v in (hi, h0, w)]


def _check(size: str, device: str, mode: str, result) -> dict[str, float]:
    out, grads = result
    ref_in = [v.detach().double().cpu().requires_grad_() for v in make_inputs(size, device, False)]
    pre = gcnii_layer_ref(*ref_in, THETA, ALPHA).detach()
    out = out.detach().double().cpu()
    keep = (out != 0) | (pre <= 0)
    positive = pre > 0
    rate = keep[positive].double().mean().item()
    sigma = math.sqrt(0.6 * 0.4 / max(1, int(positive.sum())))
    assert abs(rate - 0.6) < 5 * sigma, f"keep rate {rate:.4f}, expected 0.6 +- {5 * sigma:.4f}"
    ref = gcnii_layer_ref(*ref_in, THETA, ALPHA, DROPOUT, keep=keep)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    info = {"keep_rate": rate}
    if grads:
        cot = torch.ones_like(ref)
        want = torch.autograd.grad(ref, ref_in, cot)
        for g, w in zip(grads, want):
            torch.testing.assert_close(g.double().cpu(), w, rtol=1e-4, atol=1e-4 * w.abs().max().item())
    return info


@pytest.mark.parametrize(("device", "size", "mode", "impl"), list(_cases()))
def test_gcnii_layer(run_benchmark, device: str, size: str, mode: str, impl: str) -> None:
    if device == "cuda" and impl == "ours" and (reason := ours_cuda_skip_reason()):
        pytest.skip(reason)
    dev = torch.device(device)
    fn = _impl_fn(impl)
    backward = mode == "fwd+bwd"
    hi, h0, w = make_inputs(size, device, requires_grad=backward)
    io_bytes = 3 * hi.numel() * hi.element_size()  # hi, h0 read, out written

    def step():
        out = fn(hi, h0, w, THETA, ALPHA, DROPOUT)
        grads = torch.autograd.grad(out, (hi, h0, w), torch.ones_like(out)) if backward else ()
        sync(dev)
        return out.detach(), grads

    run_benchmark(step, impl=impl, device=dev, nbytes=2 * io_bytes if backward else io_bytes,
                  warmup=3 if impl.startswith("compiled") else 2, check=lambda r: _check(size, device, mode, r))
