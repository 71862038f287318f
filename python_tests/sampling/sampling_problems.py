"""An analytic conditional score problem for the sampler tests (and the moment study).

Data: given the condition, each element is ``x0 ~ N(mu, s^2)`` independently, with ``mu = cond / K``. Under the VE SDE
``x_t = x0 + std(t) z``, so ``x_t ~ N(mu, s^2 + std(t)^2)`` and the exact score is
``-(x - mu) / (s^2 + std(t)^2)``.

The samplers hand the score a *re-noised* condition ``c_t = cond + std(t) z`` (as IMDer does), so the score reads
``mu_hat = c_t / K``: the condition is stored ``K = 1000`` times larger than ``mu``, which makes the perturbation's
effect on ``mu_hat`` at most ``std(1) / K ~ 0.01`` early (where the state is dominated by noise anyway) and
``~3e-5`` at the end. The condition therefore still matters -- a sampler that dropped it, swapped samples, or
failed to pass it would produce ``mu_hat`` far from ``mu`` -- but the perturbation is negligible.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

K = 1000.0
S = 0.5
SIGMA = 25.0


def marginal_std(t: Tensor, sigma: float = SIGMA) -> Tensor:
    """IMDer's formula, written independently of the ops (float64)."""
    t = t.double()
    return torch.sqrt((sigma ** (2 * t) - 1.0) / 2.0 / math.log(sigma))


def make_problem(batch: int = 128, shape: tuple[int, ...] = (4, 16), *, seed: int = 1,
                 dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """``(mu, cond)``: per-sample offsets in ``[0.5, 1.5]`` plus per-element variation, ``cond = K * mu``."""
    g = torch.Generator().manual_seed(seed)
    ones = (1,) * len(shape)
    mu = 0.5 + torch.rand(batch, *ones, generator=g, dtype=torch.float64)
    mu = mu + 0.3 * torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    return mu.to(device=device, dtype=dtype), (K * mu).to(device=device, dtype=dtype)


def gaussian_score(x: Tensor, t: Tensor, c: Tensor) -> Tensor:
    """Exact score of the problem, reading ``mu`` from the (re-noised) condition."""
    var = S**2 + marginal_std(t).to(device=x.device) ** 2
    var = var.reshape(-1, *([1] * (x.dim() - 1)))
    return (-(x.double() - c.double() / K) / var).to(x.dtype)


def exact_prior(mu: Tensor, generator: torch.Generator) -> Tensor:
    """A draw of the true ``x_1 ~ N(mu, s^2 + std(1)^2)`` (IMDer starts from ``N(0, std(1)^2)`` instead)."""
    std1 = math.sqrt(S**2 + float(marginal_std(torch.tensor(1.0))) ** 2)
    z = torch.randn(mu.shape, generator=generator, dtype=torch.float64).to(device=mu.device)
    return (mu.double() + std1 * z).to(mu.dtype)


def standardized_moments(x: Tensor, mu: Tensor) -> tuple[float, float]:
    """Mean and std of ``(x - mu) / s`` over all elements: ``(0, 1)`` for exact samples."""
    z = (x.double() - mu.double()) / S
    return float(z.mean()), float(z.std())
