"""Fused sampling-step ops of score-based diffusion: IMDer's VE SDE, the Langevin corrector and DDIM.

``ve_marginal_std``, ``ve_diffusion_coeff``, ``ve_perturb``, ``ve_sde_em_step``, ``ve_ode_step``,
``langevin_corrector_step``, ``ddim_step``. The kernels are C++/CUDA (``csrc/ops/diffusion_steps/``); this module holds
the typed wrappers and registers the fake kernels (for ``torch.compile`` and meta tensors) and the closed-form
autograd formulas. Pure-PyTorch definitions: the ``*_ref`` functions of :mod:`mmer_ext.ops._reference`.

Conventions shared by the step ops:

* ``x`` is ``[B, ...]`` (any trailing shape, ``B`` may be 0). float32 / float64 on the CPU; CUDA also takes float16
  and bfloat16 (computed in float32). Outputs are contiguous tensors of ``x``'s shape and dtype; inputs may have any
  strides.
* ``t`` / ``alpha_bar_*`` are a Python float, a 0-d tensor or a ``[B]`` tensor (one value per sample, broadcast over
  the trailing dimensions). A 0-d tensor may be on the CPU whatever ``x``'s device: it is read on the host, so a CUDA
  call does not sync and can be captured in a CUDA graph (its value is then fixed in the graph). A ``[B]`` tensor or
  a 0-d tensor on ``x``'s device is read by the kernel. They are not differentiable. Times must be finite and
  ``>= 0`` (the VE SDE's std is NaN below 0); like ``alpha_bar`` in ``(0, 1]``, values on the host (floats, CPU
  tensors) are checked, values on a GPU are not read back.
* Every tensor argument is on ``x``'s device (meta included: a meta tensor among CPU ones raises), except that 0-d
  ``t`` / ``alpha_bar_*`` may stay on the CPU.
* Noise: ``noise=`` (an explicit tensor like ``x``: deterministic, differentiable) or ``generator=`` (standard normal
  noise drawn inside the kernel from a counter-based Philox stream: it never goes through memory), not both;
  neither draws from the default generator of ``x``'s device. On CUDA the draw takes its seed and offset from the
  generator's graph-safe Philox state, so the ops can be captured in a CUDA graph and replayed (each replay gets
  fresh noise, as eager calls would). The same generator state gives the same result, on any thread count and for
  every dtype (the normals are computed in float32).
* ``torch.compile(fullgraph=True)`` traces every op as one graph node with ``noise=`` or with neither argument (the
  default generator). An explicit ``generator=`` graph-breaks: dynamo (torch 2.14) cannot pass a ``torch.Generator``
  object to a custom op, so that call runs eagerly between compiled graphs.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from mmer_ext.ops._checks import check_dense, register_fake

__all__ = [
    "ddim_step",
    "langevin_corrector_step",
    "ve_diffusion_coeff",
    "ve_marginal_std",
    "ve_ode_step",
    "ve_perturb",
    "ve_sde_em_step",
]

_ops = torch.ops.mmer_ext


def _param(value: float | Tensor, op: str, name: str, dtype: torch.dtype = torch.float64) -> Tensor:
    """A per-sample parameter as the ops take it: tensors pass through, floats become 0-d CPU tensors (read on the
    host by the kernels)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"mmer_ext.{op}: {name} must be a float or a tensor, got {type(value).__name__}")
    return torch.tensor(_float(value, op, name), dtype=dtype)


def _float(value: float, op: str, name: str) -> float:
    """A scalar argument (sigma, dt, snr, eta) as a Python float; anything else is a TypeError naming it."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_complex():
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"mmer_ext.{op}: {name} must be a float, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float range (10**400)
        digits = len(str(abs(int(value))))
        raise ValueError(f"mmer_ext.{op}: {name} is too large for a float, got an int of {digits} digits") from None


def ve_marginal_std(t: float | Tensor, sigma: float = 25.0) -> Tensor:
    """Marginal standard deviation of IMDer's VE SDE, ``sqrt((sigma^(2t) - 1) / (2 ln sigma))``, elementwise.

    Args:
        t: a float (gives a 0-d tensor of the default dtype) or a floating tensor of any shape and device; finite
            and ``>= 0`` (checked on the host; a GPU tensor is not read back).
        sigma: ``> 0``, ``!= 1`` (IMDer: 25).

    Returns:
        A tensor like ``t``. Computed with ``expm1`` in float32 (float64 for float64 ``t``), so small ``t`` keeps full
        relative precision. Differentiable in ``t``: ``d std / dt = sigma^(2t) / (2 std)`` (infinite at ``t = 0``).
    """
    check_dense("mmer_ext.ve_marginal_std", t=t)
    return _ops.ve_marginal_std.default(
        _param(t, "ve_marginal_std", "t", torch.get_default_dtype()), _float(sigma, "ve_marginal_std", "sigma")
    )


def ve_diffusion_coeff(t: float | Tensor, sigma: float = 25.0) -> Tensor:
    """Diffusion coefficient ``g(t) = sigma^t`` of the VE SDE, elementwise; differentiable in ``t``.

    ``t`` as in :func:`ve_marginal_std`.
    """
    check_dense("mmer_ext.ve_diffusion_coeff", t=t)
    return _ops.ve_diffusion_coeff.default(
        _param(t, "ve_diffusion_coeff", "t", torch.get_default_dtype()),
        _float(sigma, "ve_diffusion_coeff", "sigma"),
    )


def ve_perturb(
    x: Tensor,
    t: float | Tensor,
    sigma: float = 25.0,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``x + std(t) * z``: the denoising-score-matching perturbation, and IMDer's re-noising of the condition.

    Args:
        x: ``[B, ...]``.
        t: float, 0-d or ``[B]`` (see the module docstring); not differentiable.
        sigma: VE SDE ``sigma``.
        noise: ``z`` as a tensor like ``x`` (differentiable), or None to draw it in the kernel.
        generator: the generator of ``x``'s device to draw ``z`` from (exclusive with ``noise``).

    Returns:
        A new tensor like ``x``; differentiable in ``x`` and ``noise``.
    """
    check_dense("mmer_ext.ve_perturb", x=x, t=t, noise=noise)
    return _ops.ve_perturb.default(
        x, _param(t, "ve_perturb", "t"), _float(sigma, "ve_perturb", "sigma"), noise=noise, generator=generator
    )


def ve_sde_em_step(
    x: Tensor,
    score: Tensor,
    t: float | Tensor,
    dt: float,
    sigma: float = 25.0,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One reverse-time Euler-Maruyama step of the VE SDE (IMDer's sampler loop body), fused.

    ``x_mean = x + g(t)^2 * score * dt``; ``x_next = x_mean + sqrt(dt) * g(t) * z``, ``g(t) = sigma^t``.

    Args:
        x, score: ``[B, ...]``, same shape, dtype and device.
        t: the current time: float, 0-d or ``[B]``; not differentiable.
        dt: the step, ``>= 0`` (the step goes from ``t`` to ``t - dt``).
        sigma, noise, generator: as in :func:`ve_perturb`.

    Returns:
        ``(x_next, x_mean)``; differentiable in ``x``, ``score`` and ``noise``.
    """
    check_dense("mmer_ext.ve_sde_em_step", x=x, score=score, t=t, noise=noise)
    return _ops.ve_sde_em_step.default(
        x,
        score,
        _param(t, "ve_sde_em_step", "t"),
        _float(dt, "ve_sde_em_step", "dt"),
        _float(sigma, "ve_sde_em_step", "sigma"),
        noise=noise,
        generator=generator,
    )


def ve_ode_step(x: Tensor, score: Tensor, t: float | Tensor, dt: float, sigma: float = 25.0) -> Tensor:
    """One Euler step of the probability-flow ODE of the VE SDE: ``x + 0.5 * g(t)^2 * score * dt``.

    Arguments as in :func:`ve_sde_em_step`; differentiable in ``x`` and ``score``. (Heun's method is two of these
    steps plus an average, in :mod:`mmer_ext.sampling`.)
    """
    check_dense("mmer_ext.ve_ode_step", x=x, score=score, t=t)
    return _ops.ve_ode_step.default(
        x, score, _param(t, "ve_ode_step", "t"), _float(dt, "ve_ode_step", "dt"), _float(sigma, "ve_ode_step", "sigma")
    )


def langevin_corrector_step(
    x: Tensor,
    score: Tensor,
    snr: float,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One Langevin corrector step of the predictor-corrector sampler (Song et al. 2021), fused.

    For each sample ``b``: ``eps_b = 2 * (snr * ||z_b|| / ||score_b||)^2`` (0 where ``||score_b|| = 0``),
    ``x_mean = x + eps_b * score``, ``x_next = x_mean + sqrt(2 eps_b) * z``. Norms are over all non-batch elements
    of the sample. Song et al.'s code averages the norms over the batch (one step size for the batch); per-sample sizes
    keep each sample's update independent of the rest of the batch.

    With in-kernel noise, ``||z_b||`` is a reduction over noise that is regenerated, never stored: the kernel makes
    two passes over the sample.

    Args:
        x, score: ``[B, ...]``.
        snr: the signal-to-noise ratio, ``>= 0`` (Song et al.: 0.16 for VE models).
        noise, generator: as in :func:`ve_perturb`.

    Returns:
        ``(x_next, x_mean)``; differentiable in ``x``, ``score`` (through the step size too) and ``noise``. With
        in-kernel noise the backward recovers the noise term as ``x_next - x_mean``, which loses relative precision
        in float32 where ``|x| >> sqrt(2 eps) |z|``.
    """
    check_dense("mmer_ext.langevin_corrector_step", x=x, score=score, noise=noise)
    return _ops.langevin_corrector_step.default(
        x, score, _float(snr, "langevin_corrector_step", "snr"), noise=noise, generator=generator
    )


def ddim_step(
    x_t: Tensor,
    eps: Tensor,
    alpha_bar_t: float | Tensor,
    alpha_bar_prev: float | Tensor,
    eta: float = 0.0,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM step (Song et al. 2021, eq. 12) for a model predicting ``eps``, fused.

    ``x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)``;
    ``x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - s^2) eps + s z``,
    ``s = eta * sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))``. ``s`` is taken as 0 when ``ab_t = 1`` or
    ``ab_t > ab_prev``, and ``1 - ab_prev - s^2`` is floored at 0 (rounding at ``eta = 1``).

    Args:
        x_t, eps: ``[B, ...]``.
        alpha_bar_t, alpha_bar_prev: cumulative alphas in ``(0, 1]``: float, 0-d or ``[B]``; not differentiable.
            Values on the host are checked; values on a CUDA device are not read back.
        eta: ``>= 0``; 0 is deterministic DDIM (no noise is read or drawn, the generator does not advance), 1 is
            DDPM-like ancestral sampling.
        noise, generator: as in :func:`ve_perturb`.

    Returns:
        ``(x_prev, x0_pred)``; differentiable in ``x_t``, ``eps`` and ``noise``.
    """
    check_dense(
        "mmer_ext.ddim_step", x_t=x_t, eps=eps, alpha_bar_t=alpha_bar_t, alpha_bar_prev=alpha_bar_prev, noise=noise
    )
    return _ops.ddim_step.default(
        x_t,
        eps,
        _param(alpha_bar_t, "ddim_step", "alpha_bar_t"),
        _param(alpha_bar_prev, "ddim_step", "alpha_bar_prev"),
        _float(eta, "ddim_step", "eta"),
        noise=noise,
        generator=generator,
    )


# ---- fake kernels ------------------------------------------------------------------------------------------------


def _check_param_fake(p: Tensor, x: Tensor, op: str, name: str) -> None:
    torch._check(p.dim() <= 1, lambda: f"mmer_ext.{op}: {name} must be a float, a 0-d or a [B] tensor")
    if p.dim() == 1:
        torch._check(
            p.shape[0] == x.shape[0],
            lambda: f"mmer_ext.{op}: {name} has {p.shape[0]} values but the batch size is {x.shape[0]}",
        )


def _check_like_fake(t: Tensor | None, x: Tensor, op: str, name: str) -> None:
    if t is not None:
        torch._check(t.shape == x.shape, lambda: f"mmer_ext.{op}: {name} has shape {t.shape}, x has {x.shape}")


def _new_like(x: Tensor) -> Tensor:
    return x.new_empty(x.shape)


@register_fake("mmer_ext::ve_marginal_std")
def _ve_marginal_std_fake(t, sigma=25.0):
    return _new_like(t)


@register_fake("mmer_ext::ve_diffusion_coeff")
def _ve_diffusion_coeff_fake(t, sigma=25.0):
    return _new_like(t)


@register_fake("mmer_ext::ve_perturb", host_scalar_ok=("t",))
def _ve_perturb_fake(x, t, sigma=25.0, noise=None, generator=None):
    _check_param_fake(t, x, "ve_perturb", "t")
    _check_like_fake(noise, x, "ve_perturb", "noise")
    return _new_like(x)


@register_fake("mmer_ext::ve_sde_em_step", host_scalar_ok=("t",))
def _ve_sde_em_step_fake(x, score, t, dt, sigma=25.0, noise=None, generator=None):
    _check_like_fake(score, x, "ve_sde_em_step", "score")
    _check_like_fake(noise, x, "ve_sde_em_step", "noise")
    _check_param_fake(t, x, "ve_sde_em_step", "t")
    return _new_like(x), _new_like(x)


@register_fake("mmer_ext::ve_ode_step", host_scalar_ok=("t",))
def _ve_ode_step_fake(x, score, t, dt, sigma=25.0):
    _check_like_fake(score, x, "ve_ode_step", "score")
    _check_param_fake(t, x, "ve_ode_step", "t")
    return _new_like(x)


@register_fake("mmer_ext::langevin_corrector_step")
def _langevin_corrector_step_fake(x, score, snr, noise=None, generator=None):
    _check_like_fake(score, x, "langevin_corrector_step", "score")
    _check_like_fake(noise, x, "langevin_corrector_step", "noise")
    return _new_like(x), _new_like(x)


@register_fake("mmer_ext::ddim_step", host_scalar_ok=("alpha_bar_t", "alpha_bar_prev"))
def _ddim_step_fake(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None, generator=None):
    _check_like_fake(eps, x_t, "ddim_step", "eps")
    _check_like_fake(noise, x_t, "ddim_step", "noise")
    _check_param_fake(alpha_bar_t, x_t, "ddim_step", "alpha_bar_t")
    _check_param_fake(alpha_bar_prev, x_t, "ddim_step", "alpha_bar_prev")
    return _new_like(x_t), _new_like(x_t)


# ---- autograd (closed form: every step op is affine in its tensor inputs, Langevin's step size aside) -----------


def _per_sample(p: Tensor, like: Tensor) -> Tensor:
    """A 0-d / [B] parameter as float64 broadcasting against ``like`` ([B] -> [B, 1, ..., 1]). A 0-d CPU tensor stays
    on the CPU (it mixes with tensors of any device)."""
    p = p.to(torch.float64) if p.dtype != torch.float64 else p
    if p.dim() == 1:
        p = p.to(like.device).reshape(p.shape[0], *([1] * (like.dim() - 1)))
    return p


def _cast(coef: Tensor, like: Tensor) -> Tensor:
    return coef.to(like.dtype)


def _sum_per_sample(v: Tensor) -> Tensor:
    """``[B]`` float64 sums over the non-batch dimensions, shaped to broadcast against ``v``."""
    B = v.shape[0]
    return v.reshape(B, math.prod(v.shape[1:])).double().sum(1).reshape(B, *([1] * (v.dim() - 1)))


def _ve_coefficient_setup(ctx, inputs, output):
    _, sigma = inputs
    ctx.log_sigma = math.log(sigma)
    ctx.save_for_backward(output)


def _ve_marginal_std_backward(ctx, grad):
    (std,) = ctx.saved_tensors
    # d std/dt = sigma^(2t) / (2 std), and sigma^(2t) = 1 + 2 ln(sigma) std^2: the output alone suffices.
    return grad * (1.0 + 2.0 * ctx.log_sigma * std * std) / (2.0 * std), None


def _ve_diffusion_coeff_backward(ctx, grad):
    (g,) = ctx.saved_tensors
    return grad * ctx.log_sigma * g, None


def _ve_perturb_setup(ctx, inputs, output):
    x, t, sigma, noise, _generator = inputs
    ctx.log_sigma = math.log(sigma)
    ctx.has_noise = noise is not None
    ctx.save_for_backward(t)


def _ve_perturb_backward(ctx, grad):
    (t,) = ctx.saved_tensors
    grad_noise = None
    if ctx.has_noise and ctx.needs_input_grad[3]:
        t64 = _per_sample(t, grad)
        std = torch.sqrt(torch.expm1(2.0 * ctx.log_sigma * t64) / (2.0 * ctx.log_sigma))
        grad_noise = grad * _cast(std, grad)
    return grad, None, None, grad_noise, None


def _ve_step_setup(ctx, inputs, output):
    x, score, t, dt, sigma = inputs[:5]
    ctx.log_sigma, ctx.dt = math.log(sigma), dt
    ctx.has_noise = len(inputs) > 5 and inputs[5] is not None
    ctx.save_for_backward(t)


def _g(ctx, t: Tensor, like: Tensor) -> Tensor:
    return torch.exp(ctx.log_sigma * _per_sample(t, like))


def _ve_sde_em_step_backward(ctx, grad_next, grad_mean):
    (t,) = ctx.saved_tensors
    # x_next = x_mean + ..., so x_mean's total gradient includes x_next's.
    total = grad_mean + grad_next
    g = _g(ctx, t, total)
    grad_score = total * _cast(g * g * ctx.dt, total) if ctx.needs_input_grad[1] else None
    grad_noise = None
    if ctx.has_noise and ctx.needs_input_grad[5]:
        grad_noise = grad_next * _cast(math.sqrt(ctx.dt) * g, grad_next)
    return total, grad_score, None, None, None, grad_noise, None


def _ve_ode_step_backward(ctx, grad):
    (t,) = ctx.saved_tensors
    grad_score = None
    if ctx.needs_input_grad[1]:
        g = _g(ctx, t, grad)
        grad_score = grad * _cast(0.5 * g * g * ctx.dt, grad)
    return grad, grad_score, None, None, None


def _langevin_setup(ctx, inputs, output):
    x, score, snr, noise, _generator = inputs
    x_next, x_mean = output
    ctx.snr = snr
    ctx.has_noise = noise is not None
    if ctx.has_noise:
        ctx.save_for_backward(score, noise)
    elif ctx.needs_input_grad[1]:
        # The noise term sqrt(2 eps) z is x_next - x_mean: no need to keep z.
        ctx.save_for_backward(score, x_next, x_mean)
    else:
        ctx.save_for_backward(score)


def _langevin_backward(ctx, grad_next, grad_mean):
    total = grad_mean + grad_next
    need_score = ctx.needs_input_grad[1]
    need_noise = ctx.has_noise and ctx.needs_input_grad[3]
    if not (need_score or need_noise):
        return total, None, None, None, None
    score = ctx.saved_tensors[0]
    snr = ctx.snr
    ss = _sum_per_sample(score * score)  # float64, [B, 1, ...]
    nonzero = ss > 0
    safe_ss = torch.where(nonzero, ss, torch.ones_like(ss))
    if ctx.has_noise:
        z = ctx.saved_tensors[1]
        zz = _sum_per_sample(z * z)
        eps = torch.where(nonzero, 2.0 * snr * snr * zz / safe_ss, torch.zeros_like(ss))
        n = z * _cast(torch.sqrt(2.0 * eps), z)
    else:
        x_next, x_mean = ctx.saved_tensors[1:]
        n = x_next - x_mean
        # ||n|| = sqrt(2 eps) ||z|| = 2 snr ||z||^2 / ||s||, hence eps = snr ||n|| / ||s||.
        eps = torch.where(nonzero, snr * torch.sqrt(_sum_per_sample(n * n) / safe_ss), torch.zeros_like(ss))
    grad_score = grad_noise = None
    if need_score:
        g_dot_s = _sum_per_sample(total * score)
        gn_dot_n = _sum_per_sample(grad_next * n)
        # eps ~ 1 / ||s||^2 and sqrt(2 eps) ~ 1 / ||s||: both terms pull back along s.
        radial = torch.where(nonzero, (2.0 * eps * g_dot_s + gn_dot_n) / safe_ss, torch.zeros_like(ss))
        grad_score = total * _cast(eps, total) - score * _cast(radial, score)
    if need_noise:
        z = ctx.saved_tensors[1]
        zz = _sum_per_sample(z * z)
        znorm = torch.sqrt(zz)
        s_norm = torch.sqrt(safe_ss)
        # x_mean = x + (2 snr^2 / ||s||^2) ||z||^2 s ; noise term (2 snr / ||s||) ||z|| z.
        a = torch.where(nonzero, 2.0 * snr * snr / safe_ss, torch.zeros_like(ss))
        c = torch.where(nonzero, 2.0 * snr / s_norm, torch.zeros_like(ss))
        g_dot_s = _sum_per_sample(total * score)
        gn_dot_z = _sum_per_sample(grad_next * z)
        along_z = 2.0 * a * g_dot_s + torch.where(znorm > 0, c * gn_dot_z / torch.where(znorm > 0, znorm, 1.0), 0.0)
        grad_noise = grad_next * _cast(c * znorm, grad_next) + z * _cast(along_z, z)
    return total, grad_score, None, grad_noise, None


def _ddim_coefficients(ab_t: Tensor, ab_prev: Tensor, eta: float):
    """(1/sqrt(ab_t), sqrt(1-ab_t)/sqrt(ab_t), sqrt(ab_prev), sqrt(1-ab_prev-s^2), s), as the kernels compute them."""
    one_minus_t = 1.0 - ab_t
    safe = one_minus_t > 0
    var = (1.0 - ab_prev) / torch.where(safe, one_minus_t, torch.ones_like(one_minus_t)) * (1.0 - ab_t / ab_prev)
    var = torch.where(safe, var.clamp(min=0.0), torch.zeros_like(var))
    s = eta * torch.sqrt(var)
    direction = torch.sqrt((1.0 - ab_prev - s * s).clamp(min=0.0))
    inv_sqrt_t = 1.0 / torch.sqrt(ab_t)
    return inv_sqrt_t, torch.sqrt(one_minus_t) * inv_sqrt_t, torch.sqrt(ab_prev), direction, s


def _ddim_setup(ctx, inputs, output):
    x_t, eps, ab_t, ab_prev, eta, noise, _generator = inputs
    ctx.eta = eta
    ctx.has_noise = noise is not None
    ctx.save_for_backward(ab_t, ab_prev)


def _ddim_backward(ctx, grad_prev, grad_x0):
    ab_t, ab_prev = ctx.saved_tensors
    c_x, c_e, a, d, s = _ddim_coefficients(_per_sample(ab_t, grad_prev), _per_sample(ab_prev, grad_prev), ctx.eta)
    total_x0 = grad_x0 + grad_prev * _cast(a, grad_prev)
    grad_x = total_x0 * _cast(c_x, total_x0) if ctx.needs_input_grad[0] else None
    grad_eps = None
    if ctx.needs_input_grad[1]:
        grad_eps = grad_prev * _cast(d, grad_prev) - total_x0 * _cast(c_e, total_x0)
    grad_noise = None
    if ctx.has_noise and ctx.needs_input_grad[5]:
        grad_noise = grad_prev * _cast(s, grad_prev)
    return grad_x, grad_eps, None, None, None, grad_noise, None


torch.library.register_autograd(
    "mmer_ext::ve_marginal_std", _ve_marginal_std_backward, setup_context=_ve_coefficient_setup
)
torch.library.register_autograd(
    "mmer_ext::ve_diffusion_coeff", _ve_diffusion_coeff_backward, setup_context=_ve_coefficient_setup
)
torch.library.register_autograd("mmer_ext::ve_perturb", _ve_perturb_backward, setup_context=_ve_perturb_setup)
torch.library.register_autograd(
    "mmer_ext::ve_sde_em_step", _ve_sde_em_step_backward, setup_context=_ve_step_setup
)
torch.library.register_autograd("mmer_ext::ve_ode_step", _ve_ode_step_backward, setup_context=_ve_step_setup)
torch.library.register_autograd(
    "mmer_ext::langevin_corrector_step", _langevin_backward, setup_context=_langevin_setup
)
torch.library.register_autograd("mmer_ext::ddim_step", _ddim_backward, setup_context=_ddim_setup)
