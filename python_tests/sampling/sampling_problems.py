"""Analytic conditional score problems for the sampler tests (and the moment study): the one below, and
:class:`JointGaussian` (target and condition jointly Gaussian, the exact score of each condition mode).

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


# ---------------------------------------------------------------------------------------------------------------------
# Jointly Gaussian target and condition (IMDer's recovery in miniature)


class JointGaussian:
    """Target ``x`` and condition ``c`` jointly Gaussian, with known conditional mean and covariance.

    Every sample holds ``K`` independent blocks of two features (tensors ``[B, K, 2]``); per block
    ``c ~ N(0, Sc)`` and ``x = A c + b + e``, ``e ~ N(0, Se)``, so ``x | c ~ N(A c + b, Se)``. The blocks only
    give the predictor-corrector sampler the dimension its step-size rule assumes (it sets the Langevin step from
    per-sample norms of score and noise, which are meaningless for a 2-vector); every statistic pools them.

    The three scores below are the exact minimisers of the denoising score-matching loss in each condition mode
    (:func:`mmer_ext.models.score_net.dsm_loss`), with ``s = std(t)``, ``w = (x, c)``, ``Sw`` its covariance,
    ``mw`` its mean and ``E[z | w_t] = Cov(z, w_t) Cov(w_t)^-1 (w_t - mw)``:

    * clean (``c_t = c``): the conditional score ``-(Se + s^2 I)^-1 (x_t - A c - b)``;
    * independent (``c_t = c + s z'``): ``-[I 0] (Sw + s^2 I)^-1 (w_t - mw)``, the score of ``p(x_t | c_t)``;
    * shared (``c_t = c + s z``, the target's own ``z``): ``-[I I] (Sw + s^2 [I I; I I])^-1 (w_t - mw)``. In one
      dimension (variances ``a``, ``bc``, covariance ``r``) this is ``-((bc - r) x_t + (a - r) c_t) / det``: the
      condition enters with the sign opposite to the conditional score's.
    """

    def __init__(self, blocks: int = 16, dtype: torch.dtype = torch.float64):
        self.K = blocks
        self.dtype = dtype
        f = dict(dtype=torch.float64)
        self.A = torch.tensor([[0.8, 0.0], [0.4, -0.6]], **f)
        self.b = torch.tensor([0.5, -0.5], **f)
        self.Sc = torch.tensor([[1.0, 0.3], [0.3, 1.0]], **f)
        self.Se = torch.tensor([[0.3, 0.1], [0.1, 0.4]], **f)
        sxc = self.A @ self.Sc
        self.Sw = torch.cat([torch.cat([sxc @ self.A.T + self.Se, sxc], 1), torch.cat([sxc.T, self.Sc], 1)], 0)
        self.mw = torch.cat([self.b, torch.zeros(2, **f)])

    # -- data
    def draw(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(x, c)``, both ``[n, K, 2]``."""
        c = torch.randn(n, self.K, 2, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(self.Sc).T
        e = torch.randn(n, self.K, 2, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(self.Se).T
        return (c @ self.A.T + self.b + e).to(self.dtype), c.to(self.dtype)

    def cond_mean(self, c: Tensor) -> Tensor:
        return (c.double() @ self.A.T + self.b).to(c.dtype)

    def exact_start(self, c: Tensor, generator: torch.Generator) -> Tensor:
        """A draw of the true ``x_1 | c ~ N(A c + b, Se + std(1)^2 I)``, to start the samplers from (IMDer starts
        from ``N(0, std(1)^2)``, whose offset the deterministic samplers never forget)."""
        cov = self.Se + float(marginal_std(torch.tensor(1.0))) ** 2 * torch.eye(2, dtype=torch.float64)
        z = torch.randn(c.shape, generator=generator, dtype=torch.float64)
        return (self.cond_mean(c.double()) + z @ torch.linalg.cholesky(cov).T).to(c.dtype)

    # -- the optimal scores of the three modes
    @staticmethod
    def _s2(t: Tensor) -> float:
        # The samplers call the score with all entries of t equal.
        return float(marginal_std(t.reshape(-1)[:1])) ** 2

    def clean_score(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        prec = torch.linalg.inv(self.Se + self._s2(t) * torch.eye(2, dtype=torch.float64))
        return (-(x.double() - self.cond_mean(c.double())) @ prec.T).to(x.dtype)

    def _joint_score(self, x: Tensor, t: Tensor, c: Tensor, shared: bool) -> Tensor:
        eye = torch.eye(2, dtype=torch.float64)
        j = torch.cat([eye, eye if shared else torch.zeros_like(eye)], 0)  # [4, 2]: how z enters w_t
        noise_cov = j @ j.T if shared else torch.eye(4, dtype=torch.float64)
        gain = j.T @ torch.linalg.inv(self.Sw + self._s2(t) * noise_cov)  # [2, 4]
        w = torch.cat([x.double(), c.double()], -1) - self.mw
        return (-(w @ gain.T)).to(x.dtype)

    def shared_optimum(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        return self._joint_score(x, t, c, shared=True)

    def independent_optimum(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        return self._joint_score(x, t, c, shared=False)

    def optimum(self, mode: str):
        return {"clean": self.clean_score, "shared": self.shared_optimum,
                "independent": self.independent_optimum}[mode]

    # -- what a sample says about the conditional distribution
    def fit(self, y: Tensor, c: Tensor) -> tuple[Tensor, Tensor, float]:
        """Least squares of the samples on the condition, pooled over samples and blocks: ``(coef [2, 3], residual
        covariance [2, 2], beta)``. ``coef = [A | b]`` and the covariance ``Se`` for exact conditional samples;
        ``beta`` is the slope of the samples on the true conditional mean (1 for exact samples, 0 for samples that
        ignore the condition, negative when the condition acts with the wrong sign)."""
        y2, c2 = y.double().reshape(-1, 2), c.double().reshape(-1, 2)
        design = torch.cat([c2, torch.ones(len(c2), 1, dtype=torch.float64)], 1)
        coef = torch.linalg.lstsq(design, y2).solution.T
        resid = y2 - design @ coef.T
        m = self.cond_mean(c2)
        m = m - m.mean(0)
        beta = float(((y2 - y2.mean(0)) * m).sum() / (m * m).sum())
        return coef, torch.cov(resid.T), beta

    @property
    def true_coef(self) -> Tensor:
        return torch.cat([self.A, self.b[:, None]], 1)
