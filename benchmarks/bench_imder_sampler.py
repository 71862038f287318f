"""Benchmark of IMDer's whole recovery sampler: the score network plus 100 Euler–Maruyama steps, and the few-step
samplers, at IMDer's shapes (``x``, ``cond`` ``[B, 32, 48]``, ``B`` = 32 and 128; the authors' ScoreNet, float32).

Implementations, per group ``imder_sampler/<device>/B<B>``, timed in the same run:

* ``ours``: :func:`mmer_ext.sampling.sample_em` with 100 steps over the fused step ops (noise drawn in-kernel); on
  CUDA the whole loop is captured once in a CUDA graph (:class:`mmer_ext.sampling.CUDAGraphSampler`) and replayed.
* ``ours-no-graph`` (CUDA): the same loop without the graph.
* ``eager``: the reference structure users run today: IMDer's loop in plain Python over the ``*_ref`` step functions
  of :mod:`mmer_ext.ops._reference` (``randn`` noise, ``[B]`` time tensors), 100 steps.
* ``compiled`` / ``compiled-reduce-overhead`` (CUDA): that loop with its per-step body (condition re-noising, score
  network, EM update) compiled by ``torch.compile`` (default mode / ``mode="reduce-overhead"``, i.e. Inductor's own
  CUDA graphs); ``dynamic=False``, the time is a tensor input so the 100 calls share one graph. Not run on the CPU:
  there the network is > 99 % of the time and compiling it measures Inductor's convolution and attention code, not
  the sampler (and takes minutes on a small machine).
* ``ours-<sampler>-<steps>``: the few-step samplers (Heun ODE, DDIM, PC, on the grids that suit them), same
  network; with a CUDA graph on CUDA. Their "vs ours" ratio is below 1 by the factor of time they save against the
  100-step sampler; the recovery error at equal steps is the lead's study on trained IMDer, not measured here.

On the CPU the step update is < 1 % of a step (the network dominates), so ``ours`` ~ ``eager`` is expected there;
the CPU wins are the few-step samplers. On a GPU the loop is launch-bound, which is where the fused steps and the
graph replay pay.

Correctness guard (once per device and batch size, before timing ``ours``): our EM loop fed the reference's noise
tensors (``noise_sampler``) must match the reference loop to float32 tolerance over 2 steps; every timed result must
be finite and shaped like the condition.

Smoke mode (``--benchmark-disable``): every body runs its code path with 1 step and a batch of 4 (the guard with 2
steps), so the whole file takes seconds on a CPU.
"""

from __future__ import annotations

import functools

import pytest
import torch

from mmer_ext.models.score_net import ScoreNet
from mmer_ext.ops import _reference as R
from mmer_ext.sampling import CUDAGraphSampler, sample, sample_em
from support import HAS_CUDA, allow_many_recompiles, ours_cuda_skip_reason, sync

CHANNELS, LENGTH = 32, 48
BATCHES = (32, 128)
STEPS = 100
SMOKE_STEPS = 1
SMOKE_BATCH = 4
GUARD_STEPS = 2
SIGMA, EPS = 25.0, 1e-3
# (sampler, steps, options): the few-step configurations compared with the 100-step EM sampler.
FEW_STEP = (
    ("ode-heun", 10, {"schedule": "linear"}),
    ("ode-heun", 20, {"schedule": "linear"}),
    ("ddim", 10, {"schedule": "karras"}),
    ("ddim", 20, {"schedule": "karras"}),
    ("pc", 20, {"schedule": "linear"}),
)

allow_many_recompiles()


def impls_for(device: str) -> tuple[str, ...]:
    base = ("ours", "eager")
    if device == "cuda":
        base = ("ours", "ours-no-graph", "eager", "compiled", "compiled-reduce-overhead")
    return base + tuple(f"ours-{name}-{steps}" for name, steps, _ in FEW_STEP)


def _cases():
    for device, marks in (("cpu", ()), ("cuda", (pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"),))):
        for batch in BATCHES:
            group = f"imder_sampler/{device}/B{batch}"
            for impl in impls_for(device):
                yield pytest.param(device, batch, impl, marks=(pytest.mark.benchmark(group=group), *marks),
                                   id=f"{device}-B{batch}-{impl}")


@functools.cache
def _net(device: str) -> ScoreNet:
    torch.manual_seed(0)
    return ScoreNet(CHANNELS, LENGTH, CHANNELS, sigma=SIGMA).to(device).eval()


def _cond(batch: int, device: str) -> torch.Tensor:
    return torch.randn(batch, CHANNELS, LENGTH, generator=torch.Generator().manual_seed(batch)).to(device)


# ---- the reference: IMDer's loop over the pure-PyTorch step functions -----------------------------------------------


def _reference_step(net, x, bt, cond, dt, z_cond, z_step):
    c = R.ve_perturb_ref(cond, bt, SIGMA, noise=z_cond)
    s = net(x, bt, c)
    return R.ve_sde_em_step_ref(x, s, bt, dt, SIGMA, noise=z_step)


def reference_em(net, cond, steps, *, step_fn=_reference_step, noises=None):
    """IMDer's Euler_Maruyama_sampler with the ``*_ref`` steps; ``noises`` (an iterator) replaces ``randn``."""
    draw = (lambda like: next(noises)) if noises is not None else torch.randn_like
    B = cond.shape[0]
    ts = torch.linspace(1.0, EPS, steps, device=cond.device)
    dt = float(ts[0] - ts[1])
    x = draw(cond) * R.ve_marginal_std_ref(torch.ones(B, device=cond.device), SIGMA)[:, None, None]
    mean = x
    with torch.no_grad():
        for t in ts:
            bt = torch.ones(B, device=cond.device) * t
            x, mean = step_fn(net, x, bt, cond, dt, draw(cond), draw(x))
    return mean


@functools.cache
def _compiled_step(mode: str | None):
    compiled = torch.compile(_reference_step, mode=mode, dynamic=False)
    if mode != "reduce-overhead":
        return compiled

    def step(*args):
        # Each step is a new cudagraph-trees generation: the same recorded graph replays for all 100 steps (the
        # previous step's outputs are consumed as this step's inputs), instead of one recorded node per step.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args)

    return step


# ---- correctness guard --------------------------------------------------------------------------------------------


@functools.cache
def _guard(batch: int, device: str) -> dict[str, float]:
    net, cond = _net(device), _cond(batch, device)
    recorded = []

    def noise_sampler(like):
        z = torch.randn(like.shape, generator=gen, device="cpu").to(like.device)
        recorded.append(z)
        return z

    gen = torch.Generator().manual_seed(0)
    ours = sample_em(net, cond, steps=GUARD_STEPS, noise_sampler=noise_sampler)
    ref = reference_em(net, cond, GUARD_STEPS, noises=iter(recorded))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    return {"guard_max_abs_err": float((ours - ref).abs().max())}


def _check(cond):
    def check(result):
        assert result.shape == cond.shape and bool(result.isfinite().all())

    return check


@pytest.mark.parametrize(("device", "batch", "impl"), list(_cases()))
def test_imder_sampler(run_benchmark, benchmark, device: str, batch: int, impl: str) -> None:
    if device == "cuda" and impl.startswith("ours") and (reason := ours_cuda_skip_reason()):
        pytest.skip(reason)
    dev = torch.device(device)
    smoke = benchmark.disabled
    if smoke:
        batch = SMOKE_BATCH
    net, cond = _net(device), _cond(batch, device)
    steps = SMOKE_STEPS if smoke else STEPS
    warmup = 1
    accuracy = None
    clone = False

    if impl in ("ours", "ours-no-graph"):
        accuracy = _guard(batch, device)
        if device == "cuda" and impl == "ours":
            call = functools.partial(CUDAGraphSampler(net, "em", steps=steps), cond)
        else:
            call = functools.partial(sample_em, net, cond, steps=steps)
    elif impl == "eager":
        # IMDer's loop takes dt from the first two grid times: it needs 2 steps (smoke mode has 1).
        call = functools.partial(reference_em, net, cond, max(steps, 2))
    elif impl.startswith("compiled"):
        warmup, clone = 3, True
        step_fn = _compiled_step("reduce-overhead" if impl == "compiled-reduce-overhead" else None)
        call = functools.partial(reference_em, net, cond, max(steps, 2), step_fn=step_fn)
    else:
        name, n, options = next(c for c in FEW_STEP if impl == f"ours-{c[0]}-{c[1]}")
        n = SMOKE_STEPS if smoke else n
        if device == "cuda":
            call = functools.partial(CUDAGraphSampler(net, name, steps=n, **options), cond)
        else:
            call = functools.partial(sample, name, net, cond, steps=n, **options)

    def fn():
        out = call()
        sync(dev)
        # A reduce-overhead graph reuses its output buffer on the next replay.
        return out.clone() if clone else out

    def check(result):
        _check(cond)(result)
        return accuracy

    run_benchmark(fn, impl=impl, device=dev, warmup=warmup, check=check)
