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
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mmer_ext import ops as _ops

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

ScoreFn = Callable[[Tensor, Tensor, Tensor], Tensor]
StepCallback = Callable[[dict], object]
NoiseSampler = Callable[[Tensor], Tensor]

_METHODS = ("em", "pc", "ode", "ode-heun", "ddim")

#: The condition modes of the score loss (:func:`mmer_ext.models.score_net.dsm_loss`) and the samplers. In sampling,
#: ``"shared"`` and ``"independent"`` both re-noise the condition with fresh noise (there is no target noise to share);
#: ``"clean"`` never perturbs it.
CONDITION_MODES = ("shared", "independent", "clean")


# ---------------------------------------------------------------------------------------------------------------------
# argument checks


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_float(name: str, value: object, *, low: float, high: float = math.inf, low_open: bool = True,
                 high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    ok_low = v > low if low_open else v >= low
    ok_high = v < high if high_open else v <= high
    if not (math.isfinite(v) and ok_low and ok_high):
        lo = "(" if low_open else "["
        hi = ")" if high_open or high == math.inf else "]"
        raise ValueError(f"{name} must be finite and in {lo}{low}, {high}{hi}, got {value!r}")
    return v


def _check_common(steps: object, sigma: object, eps: object) -> tuple[int, float, float]:
    steps = _check_int("steps", steps, 1)
    # std(t) divides by ln(sigma): sigma = 1 is no diffusion at all, sigma < 1 a negative variance.
    sigma = _check_float("sigma", sigma, low=1.0)
    eps = _check_float("eps", eps, low=0.0, high=1.0, high_open=True)
    return steps, sigma, eps


def _check_cond(cond: object) -> Tensor:
    if not isinstance(cond, Tensor):
        raise TypeError(f"cond must be a torch.Tensor, got {type(cond).__name__}")
    if cond.dim() < 1 or not cond.is_floating_point():
        raise ValueError(f"cond must be a floating-point tensor [B, ...], got dtype {cond.dtype} shape "
                         f"{tuple(cond.shape)}")
    return cond


def _check_x_init(x_init: Tensor | None, cond: Tensor) -> None:
    if x_init is None:
        return
    if not isinstance(x_init, Tensor):
        raise TypeError(f"x_init must be a torch.Tensor or None, got {type(x_init).__name__}")
    if x_init.shape != cond.shape or x_init.dtype != cond.dtype or x_init.device != cond.device:
        raise ValueError(
            f"x_init must match cond in shape, dtype and device: x_init {tuple(x_init.shape)} {x_init.dtype} "
            f"{x_init.device}, cond {tuple(cond.shape)} {cond.dtype} {cond.device}")


def _check_randomness(generator: torch.Generator | None, noise_sampler: NoiseSampler | None, cond: Tensor) -> None:
    if generator is not None and noise_sampler is not None:
        raise ValueError("pass either generator or noise_sampler, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != cond.device.type:
            raise ValueError(f"generator is on {generator.device} but cond is on {cond.device}; the noise is drawn "
                             "on cond's device, so the generator must live there")
    if noise_sampler is not None and not callable(noise_sampler):
        raise TypeError(f"noise_sampler must be callable, got {type(noise_sampler).__name__}")


def _time_dtype(dtype: torch.dtype) -> torch.dtype:
    # IMDer's time grid is float32; half-precision samples keep a float32 clock (0.01-wide steps near t = 1 are
    # not representable in float16), float64 samples get a float64 one.
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# time grid and per-call plan


_SCHEDULES = ("imder", "linear", "karras")
_KARRAS_RHO = 7.0


def _karras_times(steps: int, eps: float, sigma: float) -> Tensor:
    # std_i = (std_max^(1/rho) + i/(N-1) (std_min^(1/rho) - std_max^(1/rho)))^rho (Karras et al. 2022, rho = 7),
    # mapped back to VE times through t = log1p(2 ln(sigma) std^2) / (2 ln sigma); float64 on the host.
    two_log = 2.0 * math.log(sigma)
    t_ends = torch.tensor([1.0, eps], dtype=torch.float64)
    std_max, std_min = torch.sqrt(torch.expm1(two_log * t_ends) / two_log).tolist()
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    lo, hi = std_min ** (1 / _KARRAS_RHO), std_max ** (1 / _KARRAS_RHO)
    stds = (hi + ramp * (lo - hi)) ** _KARRAS_RHO
    ts = torch.log1p(two_log * stds * stds) / two_log
    ts[0] = 1.0
    if steps > 1:
        ts[-1] = eps
    return ts


def ve_timesteps(steps: int, eps: float = 1e-3, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, *, schedule: str = "imder", sigma: float = 25.0) -> Tensor:
    """The samplers' time grid: ``[steps]`` times decreasing from exactly 1 to exactly ``eps``.

    ``"imder"`` and ``"linear"``: IMDer's ``linspace(1, eps, steps)``. ``"karras"``: the times whose marginal stds are
    spaced as in Karras et al. (2022) (``rho = 7``: dense where ``std`` is small). ``steps == 1`` gives ``[1.]``.
    The schedules also differ in where each step ends (see ``schedule`` in :func:`sample_em`).
    """
    steps = _check_int("steps", steps, 1)
    eps = _check_float("eps", eps, low=0.0, high=1.0, high_open=True)
    if schedule in ("imder", "linear"):
        return torch.linspace(1.0, eps, steps, device=device, dtype=dtype)
    if schedule == "karras":
        sigma = _check_float("sigma", sigma, low=1.0)
        return _karras_times(steps, eps, sigma).to(device=device, dtype=dtype)
    raise ValueError(f"schedule must be one of {list(_SCHEDULES)}, got {schedule!r}")


@dataclass(frozen=True)
class _Plan:
    """Everything a sampling loop reads besides its inputs, precomputed before the loop (the loop itself is then
    free of host synchronisation, hence capturable in a CUDA graph)."""

    method: str
    steps: int
    sigma: float
    eps: float
    schedule: str
    dts: tuple[float, ...]  # step i integrates from ts[i] down to ts[i] - dts[i]
    ts: Tensor  # [N] on the device: ``ts[i]`` is the 0-d time handed to the ops
    t_batch: Tensor  # [N, B] contiguous: row i is the [B] time handed to score_fn
    snr: float = 0.16
    corrector_steps: int = 1
    eta: float = 0.0
    renoise_condition: bool = True  # False with condition_noise="clean"
    # DDIM through the VP parametrisation (``alpha_bar = 1 / (1 + std^2)``), per step i:
    ddim_in: Tensor | None = None  # 1 / sqrt(1 + std_i^2): VE -> VP
    ddim_eps: Tensor | None = None  # -std_i: score -> eps prediction
    ddim_ab: Tensor | None = None  # alpha_bar_i
    ddim_ab_next: Tensor | None = None  # alpha_bar_{i+1}, 1 after the last step (std = 0)
    ddim_out: Tensor | None = None  # sqrt(1 + std_{i+1}^2): VP -> VE


def _make_plan(method: str, batch: int, device: torch.device, dtype: torch.dtype, *, steps: int, sigma: float,
               eps: float, schedule: str = "imder", snr: float = 0.16, corrector_steps: int = 1,
               eta: float = 0.0, condition_noise: str = "shared") -> _Plan:
    tdtype = _time_dtype(dtype)
    ts = ve_timesteps(steps, eps, device=device, dtype=tdtype, schedule=schedule, sigma=sigma)
    if schedule == "imder":
        # IMDer takes its step from the grid as stored (a float32 difference), not from (1 - eps) / (steps - 1), and
        # keeps it for the last step too (which so ends below t = 0). The one read-back happens here, before the loop.
        dts = (float(ts[0] - ts[1]) if steps > 1 else 1.0 - eps,) * steps
    else:
        # From grid time to grid time, then from eps to exactly t = 0.
        t64 = ts.double().cpu().tolist()
        dts = tuple(a - b for a, b in zip(t64, t64[1:])) + (t64[-1],)
    t_batch = ts[:, None].expand(steps, batch).contiguous()
    extra: dict[str, Tensor] = {}
    if method == "ddim":
        # float64 coefficients (the ops read them in float64 anyway): alpha_bar is within 1e-3 of 1 at the end of
        # the grid, where float32 would keep only 4 digits of 1 - alpha_bar.
        std = _ops.ve_marginal_std(ts.double(), sigma)
        ab = 1.0 / (1.0 + std * std)
        ab_next = torch.cat([ab[1:], ab.new_ones(1)])
        extra = dict(ddim_in=ab.sqrt(), ddim_eps=-std, ddim_ab=ab, ddim_ab_next=ab_next,
                     ddim_out=ab_next.rsqrt())
    return _Plan(method=method, steps=steps, sigma=sigma, eps=eps, schedule=schedule, dts=dts, ts=ts,
                 t_batch=t_batch, snr=snr, corrector_steps=corrector_steps, eta=eta,
                 renoise_condition=condition_noise != "clean", **extra)


# ---------------------------------------------------------------------------------------------------------------------
# the step updates, shared with VEScheduler so both give the same bits


class _Noise:
    """Where the noise of the ops comes from: ``generator=`` (drawn in the kernel) or explicit ``noise=`` tensors."""

    __slots__ = ("generator", "sampler")

    def __init__(self, generator: torch.Generator | None = None, sampler: NoiseSampler | None = None):
        self.generator = generator
        self.sampler = sampler

    def __call__(self, like: Tensor) -> dict:
        if self.sampler is None:
            return {"generator": self.generator}
        z = self.sampler(like)
        if not isinstance(z, Tensor) or z.shape != like.shape:
            raise ValueError(f"noise_sampler must return a tensor of shape {tuple(like.shape)}, got "
                             f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        return {"noise": z.to(device=like.device, dtype=like.dtype)}


def _initial_sample(shape: torch.Size, dtype: torch.dtype, device: torch.device, sigma: float, noise: _Noise) -> Tensor:
    # 0 + std(1) z is exactly std(1) z: IMDer's randn * std(1), with the noise drawn by the fused op.
    zeros = torch.zeros(shape, dtype=dtype, device=device)
    return _ops.ve_perturb(zeros, 1.0, sigma, **noise(zeros))


def _condition(cond: Tensor, t: Tensor, sigma: float, noise: _Noise, renoise: bool = True) -> Tensor:
    if not renoise:
        return cond
    return _ops.ve_perturb(cond, t, sigma, **noise(cond))


def _plan_condition(plan: _Plan, cond: Tensor, t: Tensor, noise: _Noise) -> Tensor:
    return _condition(cond, t, plan.sigma, noise, plan.renoise_condition)


def _score(score_fn: ScoreFn, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
    s = score_fn(x, t, c)
    if not isinstance(s, Tensor) or s.shape != x.shape:
        got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
        raise ValueError(f"score_fn must return a tensor shaped like x {tuple(x.shape)}, got {got}")
    return s


def _report(callback: StepCallback | None, i: int, x: Tensor, t: Tensor, sigma: float, s: Tensor) -> None:
    if callback is None:
        return
    std = _ops.ve_marginal_std(t, sigma)
    callback({"x": x, "i": i, "t": t, "sigma": std, "score": s, "denoised": x + (std * std).to(x.dtype) * s})


def _em_update(x: Tensor, score: Tensor, t: Tensor, dt: float, sigma: float, noise: _Noise) -> tuple[Tensor, Tensor]:
    return _ops.ve_sde_em_step(x, score, t, dt, sigma, **noise(x))


def _langevin_update(x: Tensor, score: Tensor, snr: float, noise: _Noise) -> tuple[Tensor, Tensor]:
    return _ops.langevin_corrector_step(x, score, snr, **noise(x))


def _ode_update(x: Tensor, score: Tensor, t: Tensor, dt: float, sigma: float) -> Tensor:
    return _ops.ve_ode_step(x, score, t, dt, sigma)


def _heun_average(x: Tensor, x_euler_twice: Tensor) -> Tensor:
    # With x_e = x + d1 dt and x_euler_twice = x_e + d2 dt, the Heun step x + (d1 + d2) dt / 2 is their midpoint.
    return torch.add(x, x_euler_twice).mul_(0.5)


def _ddim_update(x: Tensor, score: Tensor, plan: _Plan, i: int, noise: _Noise) -> tuple[Tensor, Tensor]:
    """One DDIM step of the VE model at grid index ``i``; returns ``(x_next, x0_pred)``, both in the VE scale.

    VE ``x = x0 + std z`` is VP ``x / sqrt(1 + std^2) = sqrt(ab) x0 + sqrt(1 - ab) z`` with ``ab = 1 / (1 + std^2)``,
    and the optimal eps prediction is ``-std * score``. With ``eta = 0`` this is the Euler step in ``std``
    (Karras et al. 2022): ``x_next = x0 + std_next / std * (x - x0)``, ``x0 = x + std^2 score``.
    """
    x_vp = x * plan.ddim_in[i]
    eps_hat = score * plan.ddim_eps[i]
    kw = noise(x) if plan.eta > 0 else {"generator": noise.generator}
    x_prev_vp, x0 = _ops.ddim_step(x_vp, eps_hat, plan.ddim_ab[i], plan.ddim_ab_next[i], plan.eta, **kw)
    return x_prev_vp * plan.ddim_out[i], x0


# ---------------------------------------------------------------------------------------------------------------------
# the loops (capturable: no host reads, no allocation that depends on data)


def _loop_em(plan: _Plan, score_fn: ScoreFn, cond: Tensor, x: Tensor, noise: _Noise,
             callback: StepCallback | None = None) -> Tensor:
    mean = x
    for i in range(plan.steps):
        t = plan.ts[i]
        s = _score(score_fn, x, plan.t_batch[i], _plan_condition(plan, cond, t, noise))
        _report(callback, i, x, t, plan.sigma, s)
        x, mean = _em_update(x, s, t, plan.dts[i], plan.sigma, noise)
    return mean


def _loop_pc(plan: _Plan, score_fn: ScoreFn, cond: Tensor, x: Tensor, noise: _Noise,
             callback: StepCallback | None = None) -> Tensor:
    mean = x
    for i in range(plan.steps):
        t, tb = plan.ts[i], plan.t_batch[i]
        # Corrector first, then predictor (Song et al. 2021's pc_sampler order): the Langevin moves relax x towards
        # p_t before the EM step moves it to the next time.
        for _ in range(plan.corrector_steps):
            s = _score(score_fn, x, tb, _plan_condition(plan, cond, t, noise))
            x, _ = _langevin_update(x, s, plan.snr, noise)
        s = _score(score_fn, x, tb, _plan_condition(plan, cond, t, noise))
        _report(callback, i, x, t, plan.sigma, s)
        x, mean = _em_update(x, s, t, plan.dts[i], plan.sigma, noise)
    return mean


def _loop_ode(plan: _Plan, score_fn: ScoreFn, cond: Tensor, x: Tensor, noise: _Noise,
              callback: StepCallback | None = None) -> Tensor:
    for i in range(plan.steps):
        t = plan.ts[i]
        s = _score(score_fn, x, plan.t_batch[i], _plan_condition(plan, cond, t, noise))
        _report(callback, i, x, t, plan.sigma, s)
        x = _ode_update(x, s, t, plan.dts[i], plan.sigma)
    return x


def _loop_ode_heun(plan: _Plan, score_fn: ScoreFn, cond: Tensor, x: Tensor, noise: _Noise,
                   callback: StepCallback | None = None) -> Tensor:
    last = plan.steps - 1
    for i in range(plan.steps):
        t = plan.ts[i]
        s = _score(score_fn, x, plan.t_batch[i], _plan_condition(plan, cond, t, noise))
        _report(callback, i, x, t, plan.sigma, s)
        x_e = _ode_update(x, s, t, plan.dts[i], plan.sigma)
        if i == last:
            # The last step ends at t = 0 (or below, on IMDer's grid), where the score is not defined (the network
            # divides by std(t) = 0): plain Euler, as k-diffusion's Heun does on its final step to sigma = 0.
            x = x_e
            break
        t2 = plan.ts[i + 1]
        s2 = _score(score_fn, x_e, plan.t_batch[i + 1], _plan_condition(plan, cond, t2, noise))
        x = _heun_average(x, _ode_update(x_e, s2, t2, plan.dts[i], plan.sigma))
    return x


def _loop_ddim(plan: _Plan, score_fn: ScoreFn, cond: Tensor, x: Tensor, noise: _Noise,
               callback: StepCallback | None = None) -> Tensor:
    for i in range(plan.steps):
        s = _score(score_fn, x, plan.t_batch[i], _plan_condition(plan, cond, plan.ts[i], noise))
        _report(callback, i, x, plan.ts[i], plan.sigma, s)
        x, _ = _ddim_update(x, s, plan, i, noise)
    return x


_LOOPS = {"em": _loop_em, "pc": _loop_pc, "ode": _loop_ode, "ode-heun": _loop_ode_heun, "ddim": _loop_ddim}


def _run(plan: _Plan, score_fn: ScoreFn, cond: Tensor, x_init: Tensor | None, noise: _Noise,
         callback: StepCallback | None = None) -> Tensor:
    """The capturable part of a sampler call (without ``callback``): start sample, then the loop."""
    x = x_init if x_init is not None else _initial_sample(cond.shape, cond.dtype, cond.device, plan.sigma, noise)
    return _LOOPS[plan.method](plan, score_fn, cond, x, noise, callback)


def _check_condition_noise(condition_noise: object) -> str:
    if condition_noise not in CONDITION_MODES:
        raise ValueError(f"condition_noise must be one of {list(CONDITION_MODES)}, got {condition_noise!r}")
    return str(condition_noise)


def _checked_options(method: str, *, steps, sigma, eps, schedule="imder", snr=0.16, corrector_steps=1,
                     eta=0.0, condition_noise="shared") -> dict:
    steps, sigma, eps = _check_common(steps, sigma, eps)
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {list(_SCHEDULES)}, got {schedule!r}")
    opts = dict(steps=steps, sigma=sigma, eps=eps, schedule=schedule,
                condition_noise=_check_condition_noise(condition_noise))
    if method == "pc":
        opts["snr"] = _check_float("snr", snr, low=0.0)
        opts["corrector_steps"] = _check_int("corrector_steps", corrector_steps, 0)
    if method == "ddim":
        # eta > 1 would ask for more noise than the step's whole variance (negative sqrt argument).
        opts["eta"] = _check_float("eta", eta, low=0.0, high=1.0, low_open=False)
    return opts


def _sample(method: str, score_fn: ScoreFn, cond: Tensor, *, generator, x_init, noise_sampler, grad, cuda_graph,
            callback=None, **options) -> Tensor:
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable (x, t, cond) -> score, got {type(score_fn).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    cond = _check_cond(cond)
    _check_x_init(x_init, cond)
    _check_randomness(generator, noise_sampler, cond)
    opts = _checked_options(method, **options)
    if cuda_graph:
        from mmer_ext.sampling import cuda_graph as _cg

        if noise_sampler is not None or grad:
            raise ValueError("cuda_graph=True draws its noise inside the graph and runs without autograd: "
                             "noise_sampler and grad=True are not supported with it")
        if callback is not None:
            raise ValueError("cuda_graph=True replays the loop without running Python: callback is not supported "
                             "with it")
        return _cg.graphed_sample(method, score_fn, cond, generator=generator, x_init=x_init, **opts)
    if cond.shape[0] == 0:
        return torch.empty_like(cond)
    plan = _make_plan(method, cond.shape[0], cond.device, cond.dtype, **opts)
    with contextlib.nullcontext() if grad else torch.no_grad():
        return _run(plan, score_fn, cond, x_init, _Noise(generator, noise_sampler), callback)


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
