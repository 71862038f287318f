"""The shared core of the VE-SDE samplers: argument checks, the time grid, the precomputed :class:`Plan`, the noise
source, the step updates over the fused ops of :mod:`mmer_ext.ops` and the per-method loops.

:mod:`~mmer_ext.sampling.functional`, :mod:`~mmer_ext.sampling.schedulers` and :mod:`~mmer_ext.sampling.cuda_graph`
all build on it, so the three give the same bits; it imports none of them. Its names are the package's internal API
(the module is private to :mod:`mmer_ext.sampling`); the conventions they implement are documented in
:mod:`mmer_ext.sampling.functional`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mmer_ext import ops as _ops

ScoreFn = Callable[[Tensor, Tensor, Tensor], Tensor]
StepCallback = Callable[[dict], object]
NoiseSampler = Callable[[Tensor], Tensor]

METHODS = ("em", "pc", "ode", "ode-heun", "ddim")

#: The condition modes of the score loss (:func:`mmer_ext.models.score_net.dsm_loss`) and the samplers. In sampling,
#: ``"shared"`` and ``"independent"`` both re-noise the condition with fresh noise (there is no target noise to share);
#: ``"clean"`` never perturbs it.
CONDITION_MODES = ("shared", "independent", "clean")


# ---------------------------------------------------------------------------------------------------------------------
# argument checks


def check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_float(name: str, value: object, *, low: float, high: float = math.inf, low_open: bool = True,
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


def check_common(steps: object, sigma: object, eps: object) -> tuple[int, float, float]:
    steps = check_int("steps", steps, 1)
    # std(t) divides by ln(sigma): sigma = 1 is no diffusion at all, sigma < 1 a negative variance.
    sigma = check_float("sigma", sigma, low=1.0)
    eps = check_float("eps", eps, low=0.0, high=1.0, high_open=True)
    return steps, sigma, eps


def check_cond(cond: object) -> Tensor:
    if not isinstance(cond, Tensor):
        raise TypeError(f"cond must be a torch.Tensor, got {type(cond).__name__}")
    if cond.dim() < 1 or not cond.is_floating_point():
        raise ValueError(f"cond must be a floating-point tensor [B, ...], got dtype {cond.dtype} shape "
                         f"{tuple(cond.shape)}")
    return cond


def check_x_init(x_init: Tensor | None, cond: Tensor) -> None:
    if x_init is None:
        return
    if not isinstance(x_init, Tensor):
        raise TypeError(f"x_init must be a torch.Tensor or None, got {type(x_init).__name__}")
    if x_init.shape != cond.shape or x_init.dtype != cond.dtype or x_init.device != cond.device:
        raise ValueError(
            f"x_init must match cond in shape, dtype and device: x_init {tuple(x_init.shape)} {x_init.dtype} "
            f"{x_init.device}, cond {tuple(cond.shape)} {cond.dtype} {cond.device}")


def check_randomness(generator: torch.Generator | None, noise_sampler: NoiseSampler | None, cond: Tensor) -> None:
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


def time_dtype(dtype: torch.dtype) -> torch.dtype:
    # IMDer's time grid is float32; half-precision samples keep a float32 clock (0.01-wide steps near t = 1 are
    # not representable in float16), float64 samples get a float64 one.
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# time grid and per-call plan


SCHEDULES = ("imder", "linear", "karras")
_KARRAS_RHO = 7.0


def karras_times(steps: int, eps: float, sigma: float) -> Tensor:
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
    steps = check_int("steps", steps, 1)
    eps = check_float("eps", eps, low=0.0, high=1.0, high_open=True)
    if schedule in ("imder", "linear"):
        return torch.linspace(1.0, eps, steps, device=device, dtype=dtype)
    if schedule == "karras":
        sigma = check_float("sigma", sigma, low=1.0)
        return karras_times(steps, eps, sigma).to(device=device, dtype=dtype)
    raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")


@dataclass(frozen=True)
class Plan:
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


def make_plan(method: str, batch: int, device: torch.device, dtype: torch.dtype, *, steps: int, sigma: float,
               eps: float, schedule: str = "imder", snr: float = 0.16, corrector_steps: int = 1,
               eta: float = 0.0, condition_noise: str = "shared") -> Plan:
    tdtype = time_dtype(dtype)
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
    return Plan(method=method, steps=steps, sigma=sigma, eps=eps, schedule=schedule, dts=dts, ts=ts,
                 t_batch=t_batch, snr=snr, corrector_steps=corrector_steps, eta=eta,
                 renoise_condition=condition_noise != "clean", **extra)


# ---------------------------------------------------------------------------------------------------------------------
# the step updates, shared with VEScheduler so both give the same bits


class Noise:
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


def initial_sample(shape: torch.Size, dtype: torch.dtype, device: torch.device, sigma: float, noise: Noise) -> Tensor:
    # 0 + std(1) z is exactly std(1) z: IMDer's randn * std(1), with the noise drawn by the fused op.
    zeros = torch.zeros(shape, dtype=dtype, device=device)
    return _ops.ve_perturb(zeros, 1.0, sigma, **noise(zeros))


def condition(cond: Tensor, t: Tensor, sigma: float, noise: Noise, renoise: bool = True) -> Tensor:
    if not renoise:
        return cond
    return _ops.ve_perturb(cond, t, sigma, **noise(cond))


def plan_condition(plan: Plan, cond: Tensor, t: Tensor, noise: Noise) -> Tensor:
    return condition(cond, t, plan.sigma, noise, plan.renoise_condition)


def evaluate_score(score_fn: ScoreFn, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
    s = score_fn(x, t, c)
    if not isinstance(s, Tensor) or s.shape != x.shape:
        got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
        raise ValueError(f"score_fn must return a tensor shaped like x {tuple(x.shape)}, got {got}")
    return s


def report_step(callback: StepCallback | None, i: int, x: Tensor, t: Tensor, sigma: float, s: Tensor) -> None:
    if callback is None:
        return
    std = _ops.ve_marginal_std(t, sigma)
    callback({"x": x, "i": i, "t": t, "sigma": std, "score": s, "denoised": x + (std * std).to(x.dtype) * s})


def em_update(x: Tensor, score: Tensor, t: Tensor, dt: float, sigma: float, noise: Noise) -> tuple[Tensor, Tensor]:
    return _ops.ve_sde_em_step(x, score, t, dt, sigma, **noise(x))


def langevin_update(x: Tensor, score: Tensor, snr: float, noise: Noise) -> tuple[Tensor, Tensor]:
    return _ops.langevin_corrector_step(x, score, snr, **noise(x))


def ode_update(x: Tensor, score: Tensor, t: Tensor, dt: float, sigma: float) -> Tensor:
    return _ops.ve_ode_step(x, score, t, dt, sigma)


def heun_average(x: Tensor, x_euler_twice: Tensor) -> Tensor:
    # With x_e = x + d1 dt and x_euler_twice = x_e + d2 dt, the Heun step x + (d1 + d2) dt / 2 is their midpoint.
    return torch.add(x, x_euler_twice).mul_(0.5)


def ddim_update(x: Tensor, score: Tensor, plan: Plan, i: int, noise: Noise) -> tuple[Tensor, Tensor]:
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


def _loop_em(plan: Plan, score_fn: ScoreFn, cond: Tensor, x: Tensor, noise: Noise,
             callback: StepCallback | None = None) -> Tensor:
    mean = x
    for i in range(plan.steps):
        t = plan.ts[i]
        s = evaluate_score(score_fn, x, plan.t_batch[i], plan_condition(plan, cond, t, noise))
        report_step(callback, i, x, t, plan.sigma, s)
        x, mean = em_update(x, s, t, plan.dts[i], plan.sigma, noise)
    return mean


def _loop_pc(plan: Plan, score_fn: ScoreFn, cond: Tensor, x: Tensor, noise: Noise,
             callback: StepCallback | None = None) -> Tensor:
    mean = x
    for i in range(plan.steps):
        t, tb = plan.ts[i], plan.t_batch[i]
        # Corrector first, then predictor (Song et al. 2021's pc_sampler order): the Langevin moves relax x towards
        # p_t before the EM step moves it to the next time.
        for _ in range(plan.corrector_steps):
            s = evaluate_score(score_fn, x, tb, plan_condition(plan, cond, t, noise))
            x, _ = langevin_update(x, s, plan.snr, noise)
        s = evaluate_score(score_fn, x, tb, plan_condition(plan, cond, t, noise))
        report_step(callback, i, x, t, plan.sigma, s)
        x, mean = em_update(x, s, t, plan.dts[i], plan.sigma, noise)
    return mean


def _loop_ode(plan: Plan, score_fn: ScoreFn, cond: Tensor, x: Tensor, noise: Noise,
              callback: StepCallback | None = None) -> Tensor:
    for i in range(plan.steps):
        t = plan.ts[i]
        s = evaluate_score(score_fn, x, plan.t_batch[i], plan_condition(plan, cond, t, noise))
        report_step(callback, i, x, t, plan.sigma, s)
        x = ode_update(x, s, t, plan.dts[i], plan.sigma)
    return x


def _loop_ode_heun(plan: Plan, score_fn: ScoreFn, cond: Tensor, x: Tensor, noise: Noise,
                   callback: StepCallback | None = None) -> Tensor:
    last = plan.steps - 1
    for i in range(plan.steps):
        t = plan.ts[i]
        s = evaluate_score(score_fn, x, plan.t_batch[i], plan_condition(plan, cond, t, noise))
        report_step(callback, i, x, t, plan.sigma, s)
        x_e = ode_update(x, s, t, plan.dts[i], plan.sigma)
        if i == last:
            # The last step ends at t = 0 (or below, on IMDer's grid), where the score is not defined (the network
            # divides by std(t) = 0): plain Euler, as k-diffusion's Heun does on its final step to sigma = 0.
            x = x_e
            break
        t2 = plan.ts[i + 1]
        s2 = evaluate_score(score_fn, x_e, plan.t_batch[i + 1], plan_condition(plan, cond, t2, noise))
        x = heun_average(x, ode_update(x_e, s2, t2, plan.dts[i], plan.sigma))
    return x


def _loop_ddim(plan: Plan, score_fn: ScoreFn, cond: Tensor, x: Tensor, noise: Noise,
               callback: StepCallback | None = None) -> Tensor:
    for i in range(plan.steps):
        s = evaluate_score(score_fn, x, plan.t_batch[i], plan_condition(plan, cond, plan.ts[i], noise))
        report_step(callback, i, x, plan.ts[i], plan.sigma, s)
        x, _ = ddim_update(x, s, plan, i, noise)
    return x


LOOPS = {"em": _loop_em, "pc": _loop_pc, "ode": _loop_ode, "ode-heun": _loop_ode_heun, "ddim": _loop_ddim}


def run_loop(plan: Plan, score_fn: ScoreFn, cond: Tensor, x_init: Tensor | None, noise: Noise,
         callback: StepCallback | None = None) -> Tensor:
    """The capturable part of a sampler call (without ``callback``): start sample, then the loop."""
    x = x_init if x_init is not None else initial_sample(cond.shape, cond.dtype, cond.device, plan.sigma, noise)
    return LOOPS[plan.method](plan, score_fn, cond, x, noise, callback)


def check_condition_noise(condition_noise: object) -> str:
    if condition_noise not in CONDITION_MODES:
        raise ValueError(f"condition_noise must be one of {list(CONDITION_MODES)}, got {condition_noise!r}")
    return str(condition_noise)


def checked_options(method: str, *, steps, sigma, eps, schedule="imder", snr=0.16, corrector_steps=1,
                     eta=0.0, condition_noise="shared") -> dict:
    steps, sigma, eps = check_common(steps, sigma, eps)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    opts = dict(steps=steps, sigma=sigma, eps=eps, schedule=schedule,
                condition_noise=check_condition_noise(condition_noise))
    if method == "pc":
        opts["snr"] = check_float("snr", snr, low=0.0)
        opts["corrector_steps"] = check_int("corrector_steps", corrector_steps, 0)
    if method == "ddim":
        # eta > 1 would ask for more noise than the step's whole variance (negative sqrt argument).
        opts["eta"] = check_float("eta", eta, low=0.0, high=1.0, low_open=False)
    return opts
