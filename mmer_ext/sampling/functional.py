"""Functional samplers of the VE SDE of IMDer (score-based recovery of missing modalities), k-diffusion style.

Every sampler is one function ``sample_<name>(score_fn, cond, *, steps, ...) -> Tensor`` that runs the whole reverse
process and returns the recovered sample. The maths of each step is one fused op of :mod:`mmer_ext.ops` (the noise is
drawn inside the kernel from ``generator``), so the Python loop only sequences kernels and can be captured in a CUDA
graph (``cuda_graph=True``, see :mod:`mmer_ext.sampling.cuda_graph`).

The model
---------
VE SDE with ``sigma = 25``: ``dx = g(t) dw``, ``g(t) = sigma**t``, marginal ``x_t = x_0 + std(t) z`` with
``std(t) = sqrt((sigma**(2t) - 1) / (2 ln sigma))``. ``score_fn(x, t, c) -> score`` estimates ``grad_x log p_t(x | c)``:
``x`` and ``c`` are ``[B, ...]`` (IMDer: ``[B, 32, 48]``), ``t`` is a ``[B]`` tensor (all entries equal), the score has
``x``'s shape.

Common conventions (IMDer's, kept for every sampler so they are interchangeable)
--------------------------------------------------------------------------------
* Time grid ``ts = linspace(1, eps, steps)`` (:func:`ve_timesteps`) on ``cond``'s device, step ``dt = ts[0] - ts[1]``
  (``1 - eps`` when ``steps == 1``). Step ``i`` integrates from ``ts[i]`` down to ``ts[i] - dt``; the last step thus
  ends just below ``t = 0`` (IMDer's convention), except DDIM, whose last step lands exactly on ``std = 0``.
  ``schedule="linear"`` / ``"karras"`` end the last step at ``t = 0`` instead, for few-step sampling (see ``schedule``
  in the samplers' arguments).
* Start: ``x ~ N(0, std(1)^2 I)`` of ``cond``'s shape (IMDer ignores the data mean here), or ``x_init``.
* Conditioning (``condition_noise``, the mode the score network was trained in, see
  :func:`mmer_ext.models.score_net.dsm_loss`): ``"shared"`` (default, the authors') and ``"independent"``: *every*
  evaluation of the score sees a freshly re-noised condition ``c_t = cond + std(t') z`` at its own time ``t'``
  (:func:`mmer_ext.ops.ve_perturb`), as IMDer's sampler does; ``"clean"``: the score sees ``cond`` itself, never
  perturbed (the standard conditional diffusion; no condition noise is drawn).
* Randomness: ``generator`` (a ``torch.Generator`` on ``cond``'s device; ``None``: the device's default generator) is
  passed to every noisy op. The same generator state gives the same result, draw for draw. ``noise_sampler`` instead
  supplies each standard-normal tensor explicitly (``noise_sampler(like) -> Tensor`` shaped like ``like``), in this
  order: the start (like ``cond``), then per score evaluation the condition noise (like ``cond``; none with
  ``condition_noise="clean"``), then per noisy update its noise (like ``x``). It exists for exact comparisons with a
  hand-written loop; it is slower.
* The loop runs under ``torch.no_grad()`` unless ``grad=True`` (the ops are differentiable).
* ``callback``: k-diffusion's per-step hook, ``callback({"x", "i", "t", "sigma", "score", "denoised"})``, called once
  per grid step after the step's (first) score evaluation and before the update: ``x`` the sample at ``t = ts[i]``,
  ``sigma = std(t)`` (0-d tensor), ``score`` the score there, ``denoised = x + sigma^2 * score`` (the Tweedie ``x0``
  estimate, k-diffusion's ``denoised``). For progress bars and for watching ``x0`` form; it must not modify the
  tensors (they are the loop's own).
* ``B = 0``: an empty result is returned without calling ``score_fn`` (networks with norms over the batch often refuse
  empty inputs, and there is nothing to sample).

Samplers: ``"em"`` (IMDer's Euler–Maruyama), ``"pc"`` (EM predictor + Langevin corrector), ``"ode"`` / ``"ode-heun"``
(probability-flow ODE, Euler / Heun), ``"ddim"`` (the VE model run through DDIM). Score evaluations per call:
``steps`` for em/ode/ddim, ``steps * (1 + corrector_steps)`` for pc, ``2 * steps - 1`` for ode-heun.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from mmer_ext.sampling import cuda_graph as _cg
from mmer_ext.sampling._core import (
    CONDITION_MODES,
    Noise,
    NoiseSampler,
    ScoreFn,
    StepCallback,
    check_cond,
    check_randomness,
    check_x_init,
    checked_options,
    make_plan,
    run_loop,
    ve_timesteps,
)

# The step maths, the plan and the argument checks live in :mod:`mmer_ext.sampling._core` (shared with the
# scheduler and the CUDA-graph path); this module holds the public one-call samplers.
__all__ = [
    "CONDITION_MODES",
    "SAMPLERS",
    "ScoreFn",
    "sample",
    "sample_ddim",
    "sample_em",
    "sample_ode",
    "sample_ode_heun",
    "sample_pc",
    "ve_timesteps",
]


def _sample(method: str, score_fn: ScoreFn, cond: Tensor, *, generator, x_init, noise_sampler, grad, cuda_graph,
            callback=None, **options) -> Tensor:
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable (x, t, cond) -> score, got {type(score_fn).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    cond = check_cond(cond)
    check_x_init(x_init, cond)
    check_randomness(generator, noise_sampler, cond)
    opts = checked_options(method, **options)
    if cuda_graph:
        if noise_sampler is not None or grad:
            raise ValueError("cuda_graph=True draws its noise inside the graph and runs without autograd: "
                             "noise_sampler and grad=True are not supported with it")
        if callback is not None:
            raise ValueError("cuda_graph=True replays the loop without running Python: callback is not supported "
                             "with it")
        return _cg.graphed_sample(method, score_fn, cond, generator=generator, x_init=x_init, **opts)
    if cond.shape[0] == 0:
        return torch.empty_like(cond)
    plan = make_plan(method, cond.shape[0], cond.device, cond.dtype, **opts)
    with contextlib.nullcontext() if grad else torch.no_grad():
        return run_loop(plan, score_fn, cond, x_init, Noise(generator, noise_sampler), callback)


# ---------------------------------------------------------------------------------------------------------------------
# public samplers

_COMMON_DOC = """
    Args:
        score_fn: ``score_fn(x [B, ...], t [B], c [B, ...]) -> score`` shaped like ``x`` (e.g. IMDer's ``ScoreNet``).
        cond: the condition ``[B, ...]``; the sample has its shape, dtype and device. float32/float64 on the CPU,
            also float16/bfloat16 on CUDA (the ops compute in float32; the clock is float32).
        steps: number of grid times ``>= 1``.
        sigma: the VE SDE's ``sigma > 1`` (IMDer: 25).
        eps: the last grid time, in ``(0, 1)`` (IMDer: 1e-3).
        schedule: the time grid and step convention. ``"imder"`` (default): IMDer's ``linspace(1, eps, steps)``
            with one ``dt = ts[0] - ts[1]`` for every step, so the last step ends at ``eps - dt``, below ``t = 0``.
            ``"linear"``: the same grid, but each step ends on the next grid time and the last goes from ``eps`` to
            exactly ``t = 0``. ``"karras"``: Karras et al.'s spacing of the marginal std (:func:`ve_timesteps`),
            steps ending as in ``"linear"``. The overshoot of ``"imder"``'s last step shrinks the samples' spread by
            about ``dt / (2 s^2)`` for data of std ``s`` with the deterministic samplers (a few percent at 20 steps):
            prefer ``"linear"`` for few-step ODE/Heun/EM and ``"karras"`` for few-step DDIM. DDIM's last step always
            lands on ``std = 0``, so ``"imder"`` and ``"linear"`` are the same for it.
        condition_noise: the mode the score network was trained in (:data:`CONDITION_MODES`). ``"shared"``
            (default, the authors' sampler) and ``"independent"``: every score evaluation sees the condition
            re-noised with fresh noise at its time; ``"clean"``: it sees ``cond`` as is (draws no condition noise).
        generator: ``torch.Generator`` on ``cond``'s device for every noise draw (``None``: the device's default).
        x_init: start sample shaped like ``cond`` (default: ``N(0, std(1)^2)``, drawn from ``generator``).
        noise_sampler: ``f(like) -> standard normal tensor shaped like like``, replacing ``generator`` (exact tests).
        grad: run with autograd enabled (default: under ``torch.no_grad()``).
        callback: ``callback(info)`` once per grid step, k-diffusion's convention (see the module docstring).
        cuda_graph: capture the whole loop in a CUDA graph on the first call with this score_fn / shape / dtype /
            options, replay it on later calls (:mod:`mmer_ext.sampling.cuda_graph`; CUDA tensors only, ``score_fn``
            must be capturable).
"""


def sample_em(score_fn: ScoreFn, cond: Tensor, *, steps: int = 100, sigma: float = 25.0, eps: float = 1e-3,
              schedule: str = "imder", condition_noise: str = "shared", generator: torch.Generator | None = None,
              x_init: Tensor | None = None, noise_sampler: NoiseSampler | None = None, grad: bool = False,
              cuda_graph: bool = False,
              callback: StepCallback | None = None) -> Tensor:
    """IMDer's Euler–Maruyama sampler of the reverse VE SDE (its default: 100 steps).

    Per step ``i`` with ``t = ts[i]``: ``c_t = cond + std(t) z1`` (``c_t = cond`` when ``condition_noise="clean"``);
    ``mean = x + g(t)^2 score_fn(x, t, c_t) dt``;
    ``x = mean + sqrt(dt) g(t) z2``. Returns the last ``mean`` (no noise on the final step), as IMDer does.
    """
    return _sample("em", score_fn, cond, steps=steps, sigma=sigma, eps=eps, schedule=schedule,
                   condition_noise=condition_noise, generator=generator,
                   x_init=x_init, noise_sampler=noise_sampler, grad=grad, cuda_graph=cuda_graph, callback=callback)


def sample_pc(score_fn: ScoreFn, cond: Tensor, *, steps: int = 100, snr: float = 0.16, corrector_steps: int = 1,
              sigma: float = 25.0, eps: float = 1e-3, schedule: str = "imder", condition_noise: str = "shared",
              generator: torch.Generator | None = None, x_init: Tensor | None = None,
              noise_sampler: NoiseSampler | None = None, grad: bool = False, cuda_graph: bool = False,
              callback: StepCallback | None = None) -> Tensor:
    """Predictor–corrector sampler (Song et al. 2021): per grid time, ``corrector_steps`` Langevin moves
    (:func:`mmer_ext.ops.langevin_corrector_step`, step size from the signal-to-noise ratio ``snr`` and the
    per-sample norms of score and noise) then one Euler–Maruyama step. Returns the last EM mean.

    Each Langevin move and the EM step evaluate the score with their own re-noised condition (unless
    ``condition_noise="clean"``).
    ``corrector_steps = 0`` is :func:`sample_em` (same draws).
    """
    return _sample("pc", score_fn, cond, steps=steps, sigma=sigma, eps=eps, schedule=schedule, snr=snr,
                   corrector_steps=corrector_steps, condition_noise=condition_noise, generator=generator,
                   x_init=x_init, noise_sampler=noise_sampler, grad=grad, cuda_graph=cuda_graph, callback=callback)


def sample_ode(score_fn: ScoreFn, cond: Tensor, *, steps: int = 100, method: str = "euler", sigma: float = 25.0,
               eps: float = 1e-3, schedule: str = "imder", condition_noise: str = "shared",
               generator: torch.Generator | None = None, x_init: Tensor | None = None,
               noise_sampler: NoiseSampler | None = None, grad: bool = False, cuda_graph: bool = False,
               callback: StepCallback | None = None) -> Tensor:
    """Probability-flow ODE ``dx/dt = -g(t)^2 score / 2``, integrated from ``t = 1`` downwards.

    ``method="euler"``: ``x += g(t)^2 score dt / 2`` (:func:`mmer_ext.ops.ve_ode_step`) per step. ``method="heun"``:
    the Euler step to ``ts[i+1]``, a second score evaluation there (with its own condition noise, if any), the trapezoid
    average of the two slopes; the last step (which ends at or below ``t = 0``, where the score is not defined) is
    plain Euler, so ``2 * steps - 1`` evaluations. The only randomness is the start and the condition noise (none when
    ``condition_noise="clean"``: then the map from the start to the sample is deterministic).
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
    return _sample("ode-heun" if method == "heun" else "ode", score_fn, cond, steps=steps, sigma=sigma, eps=eps,
                   schedule=schedule, condition_noise=condition_noise, generator=generator, x_init=x_init,
                   noise_sampler=noise_sampler, grad=grad, cuda_graph=cuda_graph, callback=callback)


def sample_ode_heun(score_fn: ScoreFn, cond: Tensor, **kwargs) -> Tensor:
    """:func:`sample_ode` with ``method="heun"`` (the ``"ode-heun"`` entry of :data:`SAMPLERS`)."""
    if "method" in kwargs:
        raise TypeError("sample_ode_heun() fixes method='heun'; call sample_ode(..., method=...) instead")
    return sample_ode(score_fn, cond, method="heun", **kwargs)


def sample_ddim(score_fn: ScoreFn, cond: Tensor, *, steps: int = 100, eta: float = 0.0, sigma: float = 25.0,
                eps: float = 1e-3, schedule: str = "imder", condition_noise: str = "shared",
                generator: torch.Generator | None = None, x_init: Tensor | None = None,
                noise_sampler: NoiseSampler | None = None, grad: bool = False, cuda_graph: bool = False,
                callback: StepCallback | None = None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) for the VE score model, through :func:`mmer_ext.ops.ddim_step`.

    Per step: ``ab = 1 / (1 + std(t)^2)``, ``x_vp = x / sqrt(1 + std^2)``, ``eps_hat = -std * score``; the DDIM
    update goes to ``ab_next`` (the next grid time; ``1``, i.e. ``std = 0``, after the last), and the result is
    scaled back by ``sqrt(1 + std_next^2)``. ``eta = 0`` (deterministic) is the Euler step in ``std`` of the
    probability-flow ODE; ``eta`` in ``(0, 1]`` adds the ancestral noise. Returns the final ``x0`` prediction.
    """
    return _sample("ddim", score_fn, cond, steps=steps, sigma=sigma, eps=eps, schedule=schedule, eta=eta,
                   condition_noise=condition_noise, generator=generator, x_init=x_init, noise_sampler=noise_sampler,
                   grad=grad, cuda_graph=cuda_graph, callback=callback)


for _f in (sample_em, sample_pc, sample_ode, sample_ddim):
    _f.__doc__ += _COMMON_DOC
del _f

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "em": sample_em,
    "pc": sample_pc,
    "ode": sample_ode,
    "ode-heun": sample_ode_heun,
    "ddim": sample_ddim,
}


def sample(name: str, score_fn: ScoreFn, cond: Tensor, **kwargs) -> Tensor:
    """Run the sampler ``name`` (a key of :data:`SAMPLERS`: ``"em"``, ``"pc"``, ``"ode"``, ``"ode-heun"``,
    ``"ddim"``) with its keyword arguments, e.g. ``sample("ddim", net, cond, steps=20, generator=g)``."""
    try:
        fn = SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None
    return fn(score_fn, cond, **kwargs)
