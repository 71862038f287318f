"""Benchmarks of the fused sampling-step ops (``mmer_ext.ops.diffusion_steps``) against what users write today.

Implementations, timed in the same run, for ``ve_perturb``, ``ve_sde_em_step``, ``ve_ode_step``,
``langevin_corrector_step`` and ``ddim_step``:

* ``ours``: the fused op, noise drawn inside the kernel from the default generator (no noise tensor in memory).
* ``eager``: ``torch.randn_like`` + the pure-PyTorch ``*_ref`` of ``mmer_ext.ops._reference`` (IMDer's loop body
  is this sequence of small ops).
* ``compiled``: ``torch.compile`` of that eager function, default mode (Inductor generates its own RNG).
* ``compiled-max-autotune`` (CUDA only): the same with ``mode="max-autotune-no-cudagraphs"``.

The compiled baselines use ``dynamic=False`` (one graph per size, the compiler's best case); compilation happens in
the warm-up calls and is reported as "first call".

Sizes (float32; ``t`` is a ``[B]`` tensor on the device, as IMDer passes it): ``imder32`` = [32, 32, 48] and
``imder128`` = [128, 32, 48] (IMDer's recovery sampler), ``large`` = [64, 2^20] on CUDA (64 Mi elements),
[64, 2^16] on the CPU.

Correctness guard before timing: the noise-free outputs (``x_mean`` of Euler-Maruyama, ``x0_pred`` of DDIM, the ODE
step) must match the reference evaluated in float64 on the same inputs at float32 tolerances; the noise read back
from the outputs (e.g. ``(x_next - x_mean) / (sqrt(dt) g(t))``) must have mean ~0 and standard deviation ~1.

Bandwidth (CUDA): minimal unique bytes (each input tensor read once, each output written once; in-kernel noise costs
no bytes) over the median time, against the spec peak of the GPU and a measured 1 GiB copy. The baselines get the
same byte count, so their "GB/s" is an effective figure.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from mmer_ext.ops import ddim_step, langevin_corrector_step, ve_ode_step, ve_perturb, ve_sde_em_step
from mmer_ext.ops import _reference as ref
from support import COMPILE_MODES, HAS_CUDA, allow_many_recompiles, ours_cuda_skip_reason, standard_impls, sync

SIGMA = 25.0
DT = 0.999 / 99
SNR = 0.16
ETA = 0.5
AB_PREV = 0.8
SIZES = {
    "imder32": {"cpu": (32, 32, 48), "cuda": (32, 32, 48)},
    "imder128": {"cpu": (128, 32, 48), "cuda": (128, 32, 48)},
    "large": {"cpu": (64, 1 << 16), "cuda": (64, 1 << 20)},
}
# Tensors read and written per element (x, score in; outputs out), for the byte count.
OPS = {
    "ve_perturb": 2,
    "ve_sde_em_step": 4,
    "ve_ode_step": 3,
    "langevin_corrector_step": 4,
    "ddim_step": 4,
}

allow_many_recompiles()


def _cases():
    devices = [("cpu", ()), ("cuda", (pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"),))]
    for device, device_marks in devices:
        for op in OPS:
            for size in SIZES:
                group = f"diffusion_steps/{op}/{device}/{size}"
                for impl in standard_impls(device):
                    yield pytest.param(
                        device,
                        op,
                        size,
                        impl,
                        marks=(pytest.mark.benchmark(group=group), *device_marks),
                        id=f"{device}-{op}-{size}-{impl}",
                    )


# ---- implementations: fn(x, score, t) -> tuple of outputs ---------------------------------------------------------


def _ours(op: str):
    return {
        "ve_perturb": lambda x, s, t: (ve_perturb(x, t, SIGMA),),
        "ve_sde_em_step": lambda x, s, t: ve_sde_em_step(x, s, t, DT, SIGMA),
        "ve_ode_step": lambda x, s, t: (ve_ode_step(x, s, t, DT, SIGMA),),
        "langevin_corrector_step": lambda x, s, t: langevin_corrector_step(x, s, SNR),
        "ddim_step": lambda x, s, t: ddim_step(x, s, t, AB_PREV, ETA),
    }[op]


def _eager(op: str):
    def perturb(x, s, t):
        return (ref.ve_perturb_ref(x, t, SIGMA, noise=torch.randn_like(x)),)

    def em(x, s, t):
        return ref.ve_sde_em_step_ref(x, s, t, DT, SIGMA, noise=torch.randn_like(x))

    def ode(x, s, t):
        return (ref.ve_ode_step_ref(x, s, t, DT, SIGMA),)

    def langevin(x, s, t):
        return ref.langevin_corrector_step_ref(x, s, SNR, noise=torch.randn_like(x))

    def ddim(x, s, t):
        return ref.ddim_step_ref(x, s, t, AB_PREV, ETA, noise=torch.randn_like(x))

    return {
        "ve_perturb": perturb,
        "ve_sde_em_step": em,
        "ve_ode_step": ode,
        "langevin_corrector_step": langevin,
        "ddim_step": ddim,
    }[op]


@functools.cache
def _compiled(op: str, mode: str):
    return torch.compile(_eager(op), mode=mode, dynamic=False)


def _impl_fn(op: str, impl: str):
    if impl == "ours":
        return _ours(op)
    if impl == "eager":
        return _eager(op)
    return _compiled(op, COMPILE_MODES[impl])


def make_inputs(op: str, size: str, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, score (float32, like IMDer's [B, 32, 48] states) and the [B] time / alpha_bar on the device."""
    shape = SIZES[size][device]
    gen = torch.Generator().manual_seed(1234)
    x = (torch.randn(shape, generator=gen) * 3.0).to(device)
    score = torch.randn(shape, generator=gen).to(device)
    if op == "ddim_step":
        t = 0.2 + 0.5 * torch.rand(shape[0], generator=gen)
    else:
        t = 1e-3 + (1.0 - 1e-3) * torch.rand(shape[0], generator=gen)
    return x, score, t.to(device)


# ---- correctness guard --------------------------------------------------------------------------------------------


def _noise_stats(z: torch.Tensor) -> dict[str, float]:
    z = z.double()
    mean, std = float(z.mean()), float(z.std())
    tol = 10 / math.sqrt(z.numel())
    assert abs(mean) < tol and abs(std - 1) < 2 * tol, f"drawn noise has mean {mean:.4f} and std {std:.4f}"
    return {"noise_mean": mean, "noise_std": std}


def _check(op: str, x, s, t, result) -> dict[str, float]:
    x64, s64, t64 = x.double(), s.double(), t.double()
    view = (x.shape[0],) + (1,) * (x.dim() - 1)
    assert all(r.dtype == torch.float32 and r.shape == x.shape for r in result)
    if op == "ve_perturb":
        std = ref.ve_marginal_std_ref(t64, SIGMA).reshape(view)
        return _noise_stats((result[0].double() - x64) / std)
    if op == "ve_ode_step":
        expected = ref.ve_ode_step_ref(x64, s64, t64, DT, SIGMA)
        torch.testing.assert_close(result[0], expected.float(), msg=lambda m: f"{op}: {m}")
        return {"max_abs_err": float((result[0].double() - expected).abs().max())}
    if op == "ve_sde_em_step":
        nxt, mean = result
        _, expected = ref.ve_sde_em_step_ref(x64, s64, t64, DT, SIGMA, noise=torch.zeros_like(x64))
        torch.testing.assert_close(mean, expected.float(), msg=lambda m: f"{op} x_mean: {m}")
        g = ref.ve_diffusion_coeff_ref(t64, SIGMA).reshape(view)
        return _noise_stats((nxt.double() - mean.double()) / (math.sqrt(DT) * g))
    if op == "langevin_corrector_step":
        nxt, mean = result
        B, n = x.shape[0], x[0].numel()
        sf = s64.reshape(B, n)
        eps = ((mean.double() - x64).reshape(B, n) * sf).sum(1, keepdim=True) / (sf * sf).sum(1, keepdim=True)
        return _noise_stats((nxt.double() - mean.double()).reshape(B, n) / torch.sqrt(2 * eps))
    # ddim_step
    prev, x0 = result
    _, expected = ref.ddim_step_ref(x64, s64, t64, AB_PREV, ETA, noise=torch.zeros_like(x64))
    torch.testing.assert_close(x0, expected.float(), msg=lambda m: f"{op} x0_pred: {m}")
    _, _, a, d, std = ref.ddim_coefficients_ref(t64.reshape(view), torch.tensor(AB_PREV, dtype=torch.float64), ETA)
    return _noise_stats((prev.double() - (a * x0.double() + d * s64)) / std)


# ---- the benchmark ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "op", "size", "impl"), list(_cases()))
def test_diffusion_step(run_benchmark, device: str, op: str, size: str, impl: str) -> None:
    if device == "cuda" and impl == "ours" and (reason := ours_cuda_skip_reason()):
        pytest.skip(reason)
    dev = torch.device(device)
    fn = _impl_fn(op, impl)
    x, s, t = make_inputs(op, size, device)

    @torch.no_grad()
    def step():
        out = fn(x, s, t)
        sync(dev)
        return out

    run_benchmark(
        step,
        impl=impl,
        device=dev,
        nbytes=OPS[op] * x.numel() * x.element_size(),
        warmup=3 if impl.startswith("compiled") else 2,
        check=lambda result: _check(op, x, s, t, result),
    )
