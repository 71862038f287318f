"""Scale-invariant inputs for the CMD of the invariant (shared) features (IF-MMIN, NMER teachers).

CMD (``||mu_1 - mu_2|| + sum_k ||c_k(1) - c_k(2)||``) is scale-dependent: multiplying every shared feature by ``s``
multiplies the first two terms by ``s`` and ``s^2`` and the higher ones by ``s^k``, so an encoder can minimise it by
shrinking the shared features towards 0 instead of aligning the modalities (issue 15: their std ends near 0.014 and
the students' invariant term near 1e-4). Normalising the features *before* the op removes that way out:

* ``"none"``: the authors' CMD on the raw features.
* ``"l2"``: each sample's feature vector scaled to unit L2 norm (per modality), so only directions are compared.
* ``"pooled"``: all modalities divided by one common scale, the root mean square of their batch-centred features;
  the CMD is then invariant to a global rescaling but still sees the modalities' relative scales and means.

The op itself (:func:`mmer_ext.ops.cmd_pairwise`) is unchanged; only its inputs are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["CMD_NORMALIZATIONS", "normalize_for_cmd"]

CMD_NORMALIZATIONS = ("none", "l2", "pooled")


def normalize_for_cmd(xs: Sequence[Tensor], mode: str = "none", eps: float = 1e-12) -> list[Tensor]:
    """The features ``xs`` (each ``[B, D]``) as the CMD should see them under ``mode`` (module docstring)."""
    if mode not in CMD_NORMALIZATIONS:
        raise ValueError(f"cmd_normalize must be one of {CMD_NORMALIZATIONS}, got {mode!r}")
    xs = list(xs)
    if mode == "none" or not xs:
        return xs
    if mode == "l2":
        return [F.normalize(x, dim=-1, eps=eps) for x in xs]
    centred = torch.stack([(x - x.mean(dim=0, keepdim=True)).pow(2).mean() for x in xs])
    scale = centred.mean().clamp_min(eps).sqrt()  # a floor only against an all-constant batch
    return [x / scale for x in xs]
