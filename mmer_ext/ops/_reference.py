"""Pure-PyTorch references of every mmer_ext op: test oracles and benchmark baselines.

They favour clarity over speed and define the intended semantics, including edge cases (the zero-norm
subgradient of CMD is 0 because ``torch.linalg.vector_norm`` defines it so).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import torch
from torch import Tensor


def central_moments_ref(x: Tensor, n_moments: int) -> Tensor:
    """``[n_moments, D]``: row 0 the mean over the batch, row k-1 the central moment E[(x - mean)^k]."""
    mean = x.mean(0)
    centred = x - mean
    rows = [mean] + [centred.pow(k).mean(0) for k in range(2, n_moments + 1)]
    return torch.stack(rows)


def cmd_ref(x1: Tensor, x2: Tensor, n_moments: int = 5) -> Tensor:
    """||mean(x1) - mean(x2)||_2 + sum_{k=2..K} ||c_k(x1) - c_k(x2)||_2 (no range normalisation)."""
    m1, m2 = central_moments_ref(x1, n_moments), central_moments_ref(x2, n_moments)
    return torch.linalg.vector_norm(m1 - m2, dim=1).sum()


def cmd_pairwise_ref(xs: Tensor | Sequence[Tensor], n_moments: int = 5) -> Tensor:
    """Mean of :func:`cmd_ref` over all unordered pairs of ``xs``."""
    xs = list(xs.unbind(0)) if isinstance(xs, Tensor) else list(xs)
    losses = [cmd_ref(a, b, n_moments) for a, b in combinations(xs, 2)]
    return torch.stack(losses).mean()


def cmd_ifmmin_style(x1: Tensor, x2: Tensor, n_moments: int = 5) -> Tensor:
    """CMD computed the way the IF-MMIN / MISA code does it (a ``CMD`` module with ``matchnorm`` and ``scm``):
    the benchmark baseline of what users run today. Its gradient is NaN when two moments match exactly,
    because the norm is ``sum(...) ** 0.5``."""

    def matchnorm(a: Tensor, b: Tensor) -> Tensor:
        return torch.sum(torch.pow(a - b, 2)) ** 0.5

    def scm(sx1: Tensor, sx2: Tensor, k: int) -> Tensor:
        return matchnorm(torch.mean(torch.pow(sx1, k), 0), torch.mean(torch.pow(sx2, k), 0))

    mx1, mx2 = torch.mean(x1, 0), torch.mean(x2, 0)
    sx1, sx2 = x1 - mx1, x2 - mx2
    loss = matchnorm(mx1, mx2)
    for i in range(n_moments - 1):
        loss = loss + scm(sx1, sx2, i + 2)
    return loss


def cmd_pairwise_ifmmin_style(xs: Sequence[Tensor], n_moments: int = 5) -> Tensor:
    """IF-MMIN's invariant loss: the CMD of the (l, v), (l, a), (a, v) pairs, averaged; for M inputs, every pair."""
    xs = list(xs)
    loss = 0.0
    pairs = list(combinations(range(len(xs)), 2))
    for i, j in pairs:
        loss = loss + cmd_ifmmin_style(xs[i], xs[j], n_moments)
    return loss / len(pairs)
