"""Is one model better than another over seeds? Paired tests over repeated runs.

Two models trained under the same seeds (the same data order, the same test set) are compared seed by seed: the
paired t-test (``scipy.stats.ttest_rel``) asks whether the mean of the per-seed differences is non-zero. With three
seeds it has two degrees of freedom, so only a difference that is large against its spread over seeds counts; a
0.02-point gap between two means is a tie until the test says otherwise.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["paired_test", "pairwise_orderings", "markdown_orderings", "ALPHA"]

#: The level below which an ordering is called significant (two-sided).
ALPHA = 0.05


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Two-sided paired t-test of ``a`` against ``b`` (values of the same seeds in the same order).

    Returns ``{"n", "mean_a", "mean_b", "mean_diff", "std_diff" (ddof = 1), "t", "p"}``. Identical runs (every
    difference 0) have ``p = 1``; a difference constant over the seeds has ``t = ±inf``, ``p = 0``."""
    from scipy import stats

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"a and b must be 1-D and of the same length, got {x.shape} and {y.shape}")
    if x.size < 2:
        raise ValueError(f"a paired test needs at least 2 seeds, got {x.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("a and b must be finite")
    d = x - y
    if not d.any():
        t, p = 0.0, 1.0
    elif np.ptp(d) == 0:
        t, p = math.copysign(math.inf, float(d[0])), 0.0
    else:
        res = stats.ttest_rel(x, y)
        t, p = float(res.statistic), float(res.pvalue)
    return {"n": int(x.size), "mean_a": float(x.mean()), "mean_b": float(y.mean()), "mean_diff": float(d.mean()),
            "std_diff": float(d.std(ddof=1)), "t": t, "p": p}


def pairwise_orderings(per_seed: Mapping[str, Sequence[float]], alpha: float = ALPHA) -> list[dict[str, Any]]:
    """Every pair of models, the better mean first, with its paired test and ``"significant"`` (p < ``alpha``).
    ``per_seed``: ``{model: [value of seed 0, seed 1, ...]}``, the same seeds for every model. Sorted by the
    better model's mean, then the other's, both descending."""
    names = list(per_seed)
    out = []
    for m1, m2 in itertools.combinations(names, 2):
        hi, lo = (m1, m2) if np.mean(per_seed[m1]) >= np.mean(per_seed[m2]) else (m2, m1)
        test = paired_test(per_seed[hi], per_seed[lo])
        out.append({"better": hi, "worse": lo, **test, "significant": bool(test["p"] < alpha)})
    return sorted(out, key=lambda r: (-r["mean_a"], -r["mean_b"]))


def markdown_orderings(orderings: Sequence[Mapping[str, Any]], *, scale: float = 100.0, unit: str = " pt",
                       alpha: float = ALPHA) -> str:
    """The orderings as a markdown table: ``A > B``, the mean difference ± its std over seeds, t, p, verdict."""
    lines = ["| ordering | difference (mean ± std over seeds) | t | p | verdict |", "|:---|---:|---:|---:|:---|"]
    for r in orderings:
        verdict = f"**significant** (p < {alpha:g})" if r["significant"] else "not significant"
        lines.append(f"| {r['better']} > {r['worse']} | {scale * r['mean_diff']:.2f} ± {scale * r['std_diff']:.2f}"
                     f"{unit} | {r['t']:.2f} | {r['p']:.3f} | {verdict} |")
    return "\n".join(lines) + "\n"
