"""MMGCN's dialogue graph: ``angular_adjacency`` and ``block_graph_propagate``.

The kernels are C++/CUDA (``csrc/ops/angular_adjacency/``); this module holds the typed wrappers and registers the
fake kernels (for ``torch.compile`` and meta tensors) and the autograd formulas of the ops.

``torch.ops.mmer_ext.angular_adjacency`` is a CompositeImplicitAutograd op over ``_angular_adjacency_forward``,
which also returns per-node statistics (``1 / ||x||`` and ``d^-1/2``, float32 or float64) that the fused backward op
``_angular_adjacency_backward`` reads. ``block_graph_propagate`` is its own op (its backward is itself on the
transposed blocks plus ``_block_graph_outer``), so both trace into ``torch.compile`` graphs as single nodes.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from mmer_ext.ops._checks import check_dense, check_int64, register_fake

__all__ = ["angular_adjacency", "block_graph_propagate"]

_ops = torch.ops.mmer_ext
_INT64_MAX = 2**63 - 1
_INT64_MIN = -(2**63)


def angular_adjacency(
    features: Tensor,
    lengths: Tensor,
    *,
    scale: float = 0.99999,
    normalize: bool = True,
    window: int | None = None,
    layout: str = "dense",
) -> Tensor:
    """MMGCN's multimodal dialogue graph over a batch of dialogues (``MM_GCN.create_big_adj``), fused.

    Nodes: utterance ``k`` in modality ``m`` is node ``m * N + k`` (modality-major, MMGCN's order). Edge weight
    ``1 - arccos(scale * cos(u, v)) / pi``. Intra-modality edges join every pair of utterances of the same dialogue,
    self-loops included (with ``window``, only pairs at most ``window`` positions apart); inter-modality edges join
    the same utterance across modalities. With ``normalize``, the result is ``D^-1/2 A D^-1/2``, ``D`` the degrees
    over the whole graph. Edges never cross dialogues.

    Args:
        features: ``[M, N, D]``: ``M >= 1`` modalities of the same ``N`` utterances, the dialogues concatenated in
            order. float32 or float64; float16 and bfloat16 too (computed in float32). CPU or CUDA; any strides.
        lengths: ``[G]`` int64, utterances per dialogue, each ``>= 1``, summing to ``N``. On the CPU (no device
            sync) or on the features' device (read back once per call).
        scale: in ``(0, 1]``. MMGCN's ``0.99999`` keeps ``|scale * cos| < 1``, where arccos has a finite derivative.
            With ``scale = 1`` the weights of (anti)parallel pairs are exactly 1 (0), but the derivative of arccos is
            unbounded there: the backward floors ``1 - (scale * cos)^2`` at ``1e-12``, so gradients stay finite but
            reach ``~3e5`` per unit of upstream gradient at such pairs. Keep ``scale < 1`` for training.
        normalize: apply the symmetric degree normalisation.
        window: ``None`` (every pair of a dialogue, MMGCN) or ``>= 0`` (``0``: self-loops only). Any window of
            ``N`` or more (``2**63 - 1`` included) is the same as ``None``.
        layout: ``"dense"``: ``[M * N, M * N]``, the whole graph. ``"blocks"``: ``[G, M * Lmax, M * Lmax]``, one
            zero-padded block per dialogue (``Lmax = max(lengths)``), modality-major inside the block:
            ``blocks[g, m * Lmax + i, n * Lmax + j]`` is the edge between utterance ``i`` of dialogue ``g`` in modality
            ``m`` and utterance ``j`` in modality ``n``; equal to the dialogue's rows and columns of the dense matrix,
            without materialising it. Use :func:`block_graph_propagate` to multiply node features by it.

    Returns:
        The adjacency in ``features.dtype``, exactly symmetric. Differentiable (first order) with respect to
        ``features``.

    Conventions: the result does not depend on the scale of a feature vector (each row is divided by its largest
    magnitude before its norm is taken, so float32 features of 1e-30 or 1e30 give the graph they give at 1). A zero
    feature vector has cosine 0 with every vector, itself included (weight 0.5), and receives a
    zero gradient (MMGCN's code gives NaN). A self-loop's cosine is the constant 1, so self-loops carry no gradient.

    Implementation: per dialogue and modality, the cosines are one GEMM of the unit vectors (MKL on the CPU, one
    cuBLAS batched GEMM over zero-padded dialogues on CUDA, which follows ``torch.backends.cuda.matmul.allow_tf32``);
    the arccos, window, degrees and scaling are fused passes, and every output element is written once. The backward
    recomputes the cosines and needs a second GEMM (``dL/du = S @ U``, ``S`` the symmetric matrix of ``dL/dcos``).
    ``lengths`` are read on the host every call, so the op cannot be captured in a CUDA graph (it is tagged
    ``cudagraph_unsafe``). Memory: the blocks layout holds ``G * (M * Lmax)^2`` values, never ``(M * N)^2``.
    """
    if window is not None and not isinstance(window, bool) and isinstance(window, int):
        if window < _INT64_MIN:
            raise ValueError(
                f"mmer_ext.angular_adjacency: window must be None or >= 0 (0 keeps the self-loops only), got {window}"
            )
        # Any window >= N keeps every pair, as None does; a Python int beyond int64 means the same.
        window = min(window, _INT64_MAX)
    check_dense("mmer_ext.angular_adjacency", features=features, lengths=lengths)
    return _ops.angular_adjacency.default(
        features, lengths, scale=scale, normalize=normalize, window=window, layout=layout
    )


def block_graph_propagate(blocks: Tensor, x: Tensor, lengths: Tensor, num_modalities: int) -> Tensor:
    """``A @ x`` for node features ``x`` in the global node order, with ``A`` given as per-dialogue blocks.

    Args:
        blocks: ``[G, M * Lmax, M * Lmax]`` as returned by :func:`angular_adjacency` with ``layout="blocks"``. Any
            block matrices of that layout work (the full blocks are used, not only the edges MMGCN's graph has);
            entries in the padding do not contribute, but must be finite (on CUDA they are multiplied by zeros).
        x: ``[M * N, F]``: row ``m * N + k`` holds utterance ``k`` in modality ``m`` (MMGCN's node order). Same
            dtype and device as ``blocks``.
        lengths: ``[G]`` int64 as for :func:`angular_adjacency`.
        num_modalities: ``M >= 1``, the number of modalities (``features.shape[0]`` of the adjacency). Explicit
            because ``x``'s rows and ``lengths`` alone can fit another ``M``: 12 rows with lengths ``[3, 3]`` read as
            2 modalities of 6 utterances, with ``[2, 2]`` as 3 of 4, and both give blocks of 6 slots.

    Returns:
        ``[M * N, F]``, equal to ``dense_adjacency @ x`` but costing ``O(G * (M * Lmax)^2 * F)`` instead of
        ``O((M * N)^2 * F)``. Differentiable with respect to ``blocks`` and ``x`` (to any order: the backward is made of
        this op on the transposed blocks and ``_block_graph_outer``, whose own backward is this op again).

    On the CPU each dialogue is ``M^2`` GEMMs of its ``L x L`` sub-blocks with strided views of ``x`` (no padding, no
    gather); on CUDA the nodes are gathered into zero-padded slots for one batched GEMM. Like
    :func:`angular_adjacency`, the op reads ``lengths`` on the host every call (not CUDA-graph capturable).
    """
    if isinstance(num_modalities, bool) or not isinstance(num_modalities, (numbers.Integral, torch.SymInt)):
        raise TypeError(
            f"mmer_ext.block_graph_propagate: num_modalities must be an int, got {type(num_modalities).__name__}"
        )
    if isinstance(num_modalities, numbers.Integral):
        num_modalities = int(num_modalities)  # a NumPy integer too
    check_dense("mmer_ext.block_graph_propagate", blocks=blocks, x=x, lengths=lengths)
    check_int64("mmer_ext.block_graph_propagate", "num_modalities", num_modalities)
    return _ops.block_graph_propagate.default(blocks, x, lengths, num_modalities)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- fake kernels --------------------------------------------------------------------------------------------------


def _check_features(features: Tensor, lengths: Tensor, op: str) -> None:
    torch._check(features.dim() == 3, lambda: f"{op}: features must be [M, N, D], got {tuple(features.shape)}")
    torch._check(lengths.dim() == 1, lambda: f"{op}: lengths must be [G], got {tuple(lengths.shape)}")


def _max_length(lengths: Tensor):
    """Lmax = max(lengths), the blocks' size. Read when lengths hold values (CPU lengths next to meta features);
    an unbacked size under torch.compile (fake lengths)."""
    if not is_fake(lengths) and lengths.device.type == "cpu":
        return int(lengths.max()) if lengths.numel() else 0
    try:
        return torch.library.get_ctx().new_dynamic_size()
    except RuntimeError:  # a plain meta kernel call: no context for data-dependent sizes
        raise RuntimeError(
            f"mmer_ext.angular_adjacency: lengths is on {lengths.device}, so the size of the layout=\"blocks\" "
            "output (max(lengths)) is unknown; pass lengths on the CPU"
        ) from None


@register_fake(
    "mmer_ext::_angular_adjacency_forward", op_name="mmer_ext.angular_adjacency", host_ok=("lengths",)
)
def _angular_adjacency_forward_fake(
    features: Tensor, lengths: Tensor, scale: float, normalize: bool, window: int | None, layout: str
) -> tuple[Tensor, Tensor]:
    _check_features(features, lengths, "mmer_ext.angular_adjacency")
    M, N, _ = features.shape
    stats = features.new_empty((2, M, N), dtype=_opmath(features.dtype))
    if layout == "blocks":
        max_length = _max_length(lengths)
        slots = M * max_length
        return features.new_empty((lengths.shape[0], slots, slots)), stats
    return features.new_empty((M * N, M * N)), stats


@register_fake("mmer_ext::_angular_adjacency_backward", host_ok=("lengths",))
def _angular_adjacency_backward_fake(
    grad: Tensor,
    features: Tensor,
    lengths: Tensor,
    stats: Tensor,
    scale: float,
    normalize: bool,
    window: int | None,
    layout: str,
) -> Tensor:
    return torch.empty_like(features, memory_format=torch.contiguous_format)


@register_fake("mmer_ext::block_graph_propagate", host_ok=("lengths",))
def _block_graph_propagate_fake(blocks: Tensor, x: Tensor, lengths: Tensor, num_modalities: int) -> Tensor:
    torch._check(blocks.dim() == 3, lambda: f"mmer_ext.block_graph_propagate: blocks must be 3-d, got {blocks.shape}")
    torch._check(x.dim() == 2, lambda: f"mmer_ext.block_graph_propagate: x must be [nodes, F], got {x.shape}")
    torch._check(
        num_modalities >= 1,
        lambda: f"mmer_ext.block_graph_propagate: num_modalities must be >= 1, got {num_modalities}",
    )
    return x.new_empty(x.shape)


@register_fake("mmer_ext::_block_graph_outer", host_ok=("lengths",))
def _block_graph_outer_fake(a: Tensor, b: Tensor, lengths: Tensor, num_modalities: int, slots) -> Tensor:
    return a.new_empty((lengths.shape[0], slots, slots))


# ---- autograd ------------------------------------------------------------------------------------------------------


def _angular_adjacency_setup(ctx, inputs, output):
    features, lengths, scale, normalize, window, layout = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(features, lengths, stats)
    ctx.options = (scale, normalize, window, layout)


def _angular_adjacency_backward(ctx, grad, _grad_stats):
    features, lengths, stats = ctx.saved_tensors
    grad_features = _ops._angular_adjacency_backward.default(grad, features, lengths, stats, *ctx.options)
    return grad_features, None, None, None, None, None


def _block_graph_propagate_setup(ctx, inputs, output):
    blocks, x, lengths, num_modalities = inputs
    ctx.save_for_backward(blocks if ctx.needs_input_grad[1] else None, x if ctx.needs_input_grad[0] else None, lengths)
    ctx.slots = blocks.shape[1]
    ctx.num_modalities = num_modalities


def _block_graph_propagate_backward(ctx, grad):
    blocks, x, lengths = ctx.saved_tensors
    grad_blocks = grad_x = None
    if ctx.needs_input_grad[0]:
        grad_blocks = _ops._block_graph_outer.default(grad, x, lengths, ctx.num_modalities, ctx.slots)
    if ctx.needs_input_grad[1]:
        grad_x = _ops.block_graph_propagate.default(blocks.transpose(1, 2), grad, lengths, ctx.num_modalities)
    return grad_blocks, grad_x, None, None


def _block_graph_outer_setup(ctx, inputs, output):
    a, b, lengths, num_modalities, _ = inputs
    ctx.save_for_backward(a if ctx.needs_input_grad[1] else None, b if ctx.needs_input_grad[0] else None, lengths)
    ctx.num_modalities = num_modalities


def _block_graph_outer_backward(ctx, grad):
    # out[g] = A_g B_g^T over the dialogue's slots, so dA = out_grad @ B and dB = out_grad^T @ A, both propagations.
    a, b, lengths = ctx.saved_tensors
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = _ops.block_graph_propagate.default(grad, b, lengths, ctx.num_modalities)
    if ctx.needs_input_grad[1]:
        grad_b = _ops.block_graph_propagate.default(grad.transpose(1, 2), a, lengths, ctx.num_modalities)
    return grad_a, grad_b, None, None, None


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(
        "mmer_ext.angular_adjacency: second derivatives are not implemented (its backward is a fused kernel with a "
        "first-order formula). Use angular_adjacency_ref in mmer_ext.ops._reference for gradient penalties."
    )


torch.library.register_autograd(
    "mmer_ext::_angular_adjacency_forward", _angular_adjacency_backward, setup_context=_angular_adjacency_setup
)
# Differentiating the backward op would otherwise warn and treat its output as a constant: a silently wrong second
# derivative. Refuse it instead.
torch.library.register_autograd("mmer_ext::_angular_adjacency_backward", _refuse_double_backward)
torch.library.register_autograd(
    "mmer_ext::block_graph_propagate", _block_graph_propagate_backward, setup_context=_block_graph_propagate_setup
)
torch.library.register_autograd(
    "mmer_ext::_block_graph_outer", _block_graph_outer_backward, setup_context=_block_graph_outer_setup
)
