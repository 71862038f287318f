"""``nn.Module`` forms of the ops, for models built from layers (as ``torchvision.ops`` pairs ``roi_align`` with
``RoIAlign``). They hold no parameters or buffers: the options are fixed, and checked, at construction; ``forward`` is
the functional op.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mmer_ext.ops.angular_adjacency import angular_adjacency, block_graph_propagate
from mmer_ext.ops.cmd import cmd, cmd_pairwise

__all__ = ["AngularAdjacency", "BlockGraphPropagate", "CMDLoss"]

LAYOUTS = ("dense", "blocks")


def _check_int(name: str, value, minimum: int, owner: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")


class CMDLoss(nn.Module):
    """Central moment discrepancy as a loss (:func:`~mmer_ext.ops.cmd`, :func:`~mmer_ext.ops.cmd_pairwise`).

    ``loss(x1, x2)`` is ``cmd(x1, x2)``; ``loss(x1, x2, x3, ...)``, ``loss([x1, x2, ...])`` or ``loss(xs)`` with ``xs``
    of shape ``[M, B, D]`` is the mean over all pairs (IF-MMIN's invariant loss: ``CMDLoss()(s_l, s_v, s_a)``).

    Args:
        n_moments: ``K >= 1``, the moments compared (IF-MMIN and MISA use 5).
    """

    def __init__(self, n_moments: int = 5) -> None:
        super().__init__()
        _check_int("n_moments", n_moments, 1, "CMDLoss")
        self.n_moments = n_moments

    def forward(self, *xs: Tensor | Sequence[Tensor]) -> Tensor:
        if len(xs) == 2:
            return cmd(xs[0], xs[1], self.n_moments)
        if len(xs) == 1:
            return cmd_pairwise(xs[0], self.n_moments)
        if not xs:
            raise TypeError("CMDLoss: expected two or more tensors, a sequence of them, or one [M, B, D] tensor")
        return cmd_pairwise(list(xs), self.n_moments)

    def extra_repr(self) -> str:
        return f"n_moments={self.n_moments}"


class AngularAdjacency(nn.Module):
    """MMGCN's multimodal dialogue graph (:func:`~mmer_ext.ops.angular_adjacency`): ``forward(features, lengths)``.

    Args:
        scale: in ``(0, 1]`` (MMGCN: 0.99999).
        normalize: apply ``D^-1/2 A D^-1/2``.
        window: ``None`` (every pair of a dialogue) or ``>= 0``.
        layout: ``"dense"`` (``[M * N, M * N]``) or ``"blocks"`` (``[G, M * Lmax, M * Lmax]``, for
            :class:`BlockGraphPropagate`).
    """

    def __init__(self, scale: float = 0.99999, normalize: bool = True, window: int | None = None,
                 layout: str = "dense") -> None:
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 < scale <= 1.0:
            raise ValueError(f"AngularAdjacency: scale must be a number in (0, 1], got {scale!r}")
        if not isinstance(normalize, bool):
            raise ValueError(f"AngularAdjacency: normalize must be a bool, got {normalize!r}")
        if window is not None:
            _check_int("window", window, 0, "AngularAdjacency")
        if layout not in LAYOUTS:
            raise ValueError(f"AngularAdjacency: layout must be one of {LAYOUTS}, got {layout!r}")
        self.scale = float(scale)
        self.normalize = normalize
        self.window = window
        self.layout = layout

    def forward(self, features: Tensor, lengths: Tensor) -> Tensor:
        return angular_adjacency(features, lengths, scale=self.scale, normalize=self.normalize, window=self.window,
                                 layout=self.layout)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, normalize={self.normalize}, window={self.window}, layout={self.layout!r}"


class BlockGraphPropagate(nn.Module):
    """``A @ x`` with ``A`` as per-dialogue blocks (:func:`~mmer_ext.ops.block_graph_propagate`):
    ``forward(blocks, x, lengths)``. A layer for models written as a sequence of modules.

    Args:
        num_modalities: ``M >= 1``, fixed at construction: ``x``'s rows and ``lengths`` alone can fit another ``M``
            (see :func:`~mmer_ext.ops.block_graph_propagate`), and a graph layer's modality count is part of the
            model, not of the batch.
    """

    def __init__(self, num_modalities: int) -> None:
        super().__init__()
        _check_int("num_modalities", num_modalities, 1, "BlockGraphPropagate")
        self.num_modalities = int(num_modalities)

    def forward(self, blocks: Tensor, x: Tensor, lengths: Tensor) -> Tensor:
        return block_graph_propagate(blocks, x, lengths, self.num_modalities)

    def extra_repr(self) -> str:
        return f"num_modalities={self.num_modalities}"
