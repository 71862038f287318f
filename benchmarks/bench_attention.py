"""Benchmarks of ``mmer_ext.ops.attention`` (scaled dot-product attention for narrow heads) against
``torch.nn.functional.scaled_dot_product_attention`` and ``torch.compile`` of it.

Implementations, timed in the same run:

* ``ours``: ``attention`` (query rows in vector lanes, in-kernel Philox dropout regenerated in the backward).
* ``eager``: ``scaled_dot_product_attention`` with the same boolean mask (negated: SDPA's True means *attend*) and
  dropout, what MulT called before the op (on the CPU: the flash kernel, and the unfused math path with dropout).
* ``compiled``: ``torch.compile`` of that (default mode, ``dynamic=False``).

Sizes ``[B, H, L, D]``: ``mult`` = [32, 8, 48, 4], MulT's attention in IMDer (d = 32, 8 heads, batch 32, the
synthetic data's 48 steps), with dropout 0.2 (the authors' ``attn_dropout_a``) in ``train`` and none in ``eval``;
``wide`` = [32, 4, 48, 16] (head width 16, where the op is not made to win) and ``long`` = [8, 8, 256, 8].
``fwd+bwd`` takes ``torch.autograd.grad`` with respect to query, key and value.

Correctness guard: without dropout, output and gradients against the float64 reference; with dropout every
implementation draws its own mask, so the guard checks that the output is finite and that its mean over the batch
matches the undropped output's (inverted dropout is unbiased) within 5 standard errors.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from support import HAS_CUDA, allow_many_recompiles, ours_cuda_skip_reason, standard_impls, sync, COMPILE_MODES
from mmer_ext.ops import attention
from mmer_ext.ops._reference import attention_ref

SIZES = {"mult": (32, 8, 48, 4), "wide": (32, 4, 48, 16), "long": (8, 8, 256, 8)}
CASES = [("mult", "train", 0.2), ("mult", "eval", 0.0), ("wide", "eval", 0.0), ("long", "eval", 0.0)]
MODES = ("fwd", "fwd+bwd")

allow_many_recompiles()


def attention_eager(q, k, v, dropout):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)


@functools.cache
def _compiled(mode: str):
    return torch.compile(attention_eager, mode=mode, dynamic=False)


def _impl_fn(impl: str):
    if impl == "ours":
        return lambda q, k, v, p: attention(q, k, v, None, p)
    if impl == "eager":
        return attention_eager
    return _compiled(COMPILE_MODES[impl])


def make_inputs(size: str, device: str, requires_grad: bool) -> list[torch.Tensor]:
    b, h, length, d = SIZES[size]
    gen = torch.Generator().manual_seed(1234)
    # [B, L, H, D] memory, as an in-projection produces them
    return [torch.randn(b, length, h, d, generator=gen).transpose(1, 2).to(device).requires_grad_(requires_grad)
            for _ in range(3)]


def _check(size: str, device: str, dropout: float, result) -> dict[str, float]:
    out, grads = result
    ref_in = [v.detach().double().cpu().requires_grad_() for v in make_inputs(size, device, False)]
    ref = attention_ref(*ref_in)
    out = out.detach().double().cpu()
    assert torch.isfinite(out).all()
    if dropout:
        diff = (out - ref.detach()).mean(0)  # per [H, L, D] position, over the batch
        stderr = (out - ref.detach()).std(0) / out.shape[0] ** 0.5
        z = (diff.abs() / stderr.clamp_min(1e-12)).mean().item()
        assert z < 5, f"mean output off the undropped one by {z:.2f} standard errors on average"
        return {"mean_z": z}
    torch.testing.assert_close(out, ref.detach(), rtol=1e-4, atol=1e-5)
    if grads:
        want = torch.autograd.grad(ref, ref_in, torch.ones_like(ref))
        for g, w in zip(grads, want):
            torch.testing.assert_close(g.double().cpu(), w, rtol=1e-4, atol=1e-4 * w.abs().max().item())
    return {}


def _cases():
    devices = [("cpu", ()), ("cuda", (pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"),))]
    for device, device_marks in devices:
        for size, phase, dropout in CASES:
            for mode in MODES:
                for impl in standard_impls(device):
                    yield pytest.param(device, size, phase, dropout, mode, impl,
                                       marks=(pytest.mark.benchmark(group=f"attention/{device}/{size}-{phase}/{mode}"),
                                              *device_marks),
                                       id=f"{device}-{size}-{phase}-{mode}-{impl}")


@pytest.mark.parametrize(("device", "size", "phase", "dropout", "mode", "impl"), list(_cases()))
def test_attention(run_benchmark, device: str, size: str, phase: str, dropout: float, mode: str, impl: str) -> None:
    if device == "cuda" and impl == "ours" and (reason := ours_cuda_skip_reason()):
        pytest.skip(reason)
    dev = torch.device(device)
    fn = _impl_fn(impl)
    backward = mode == "fwd+bwd"
    q, k, v = make_inputs(size, device, requires_grad=backward)
    io_bytes = 4 * q.numel() * q.element_size()  # q, k, v read, out written

    def step():
        out = fn(q, k, v, dropout)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out)) if backward else ()
        sync(dev)
        return out.detach(), grads

    run_benchmark(step, impl=impl, device=dev, nbytes=2 * io_bytes if backward else io_bytes,
                  warmup=3 if impl.startswith("compiled") else 2, check=lambda r: _check(size, device, dropout, r))
