"""Tests of the angular adjacency op family: ``angular_adjacency`` (MMGCN's dialogue graph), ``block_graph_propagate``
and their private helper ops.

Oracle: the pure-PyTorch references of ``mmer_ext.ops._reference``, evaluated in float64 on exactly the values the op
saw (inputs are generated in float64, rounded to the dtype under test, and the reference reads them back), plus a
loop written the way MMGCN's ``create_big_adj`` builds the graph. Tolerances are derived from the data (see
``forward_tolerance`` and ``grad_tolerance``).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import mmer_ext  # noqa: F401  (loads the compiled library; registers torch.ops.mmer_ext)
from mmer_ext.ops import angular_adjacency, block_graph_propagate
from mmer_ext.ops._reference import (
    angular_adjacency_mmgcn_loop,
    angular_adjacency_ref,
    block_graph_propagate_ref,
)
from op_testing import (  # noqa: E402  (this folder, put on sys.path by pytest)
    ALL_DTYPES,
    acc_eps,
    as_float64_cpu,
    assert_within,
    cuda_only,
    dtype_id,
    out_eps,
    place,
)

LAYOUTS = ["dense", "blocks"]
SCALE = 0.99999

ops = torch.ops.mmer_ext


def _iemocap_like_lengths() -> list[int]:
    # An IEMOCAP training batch: 16 dialogues, 781 utterances, lengths in [10, 110].
    lengths = [64, 62, 21, 45, 92, 36, 80, 15, 26, 90, 29, 56, 17, 17, 44, 87]
    assert sum(lengths) == 781
    return lengths


# (M, lengths, D): one dialogue; dialogues of length 1; odd sizes (partial SIMD vectors, 17 > 16 lanes); a single
# modality (no inter-modality edges); four modalities; and an IEMOCAP-like batch at MMGCN's sizes (slow-ish, so only
# a few tests use it).
CASES = {
    "one-dialogue": (3, [7], 5),
    "length-1": (3, [1, 1, 1], 4),
    "mixed-1": (2, [1, 5, 1, 2], 3),
    "odd": (3, [3, 1, 5, 2], 17),
    "one-modality": (1, [4, 3], 6),
    "four-modalities": (4, [2, 6, 3], 9),
}
IEMOCAP = (3, _iemocap_like_lengths(), 200)


# ---- inputs ------------------------------------------------------------------------------------------------------


def _values(M: int, N: int, D: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # A shared component per utterance makes the modalities of an utterance correlated (cosines away from 0, as
    # with real features), and a random scale per row exercises the normalisation.
    shared = torch.randn(1, N, D, generator=gen, dtype=torch.float64)
    own = torch.randn(M, N, D, generator=gen, dtype=torch.float64)
    rows = torch.rand(M, N, 1, generator=gen, dtype=torch.float64) * 3 + 0.1
    return (0.7 * shared + own) * rows


def sample_inputs(case, device, dtype, *, layout="contiguous", requires_grad=False, seed=0):
    M, lengths, D = case
    x = place(_values(M, sum(lengths), D, seed), device, dtype, layout)
    return x.detach().requires_grad_(requires_grad), torch.tensor(lengths, dtype=torch.int64)


# ---- tolerances --------------------------------------------------------------------------------------------------
# Error model. The kernels compute in float32 for float32/float16/bfloat16 inputs and in float64 for float64 ("acc
# eps"), then round to the input dtype ("out eps"). A cosine of unit vectors of dimension D carries a rounding
# error of at most about sqrt(D) acc_eps, which the arccos turns into a weight error of w'(c) = scale / (pi sqrt(1 -
# (scale c)^2)) times that: the condition number of the input, taken at its worst edge from the float64 reference.
# Degrees and the normalisation add a few acc_eps relative. This is a worst-case bound: float32/float64 errors
# measure below 1% of it on this file's cases, while 16-bit results sit near half their tolerance (the output
# rounding, half an ulp). Any wrong edge, missed degree term or wrong sign gives errors of the order of the entries
# themselves, far outside it.

C_FWD = 2.0
C_GRAD = 4.0


def _condition(x64: torch.Tensor, lengths: torch.Tensor) -> float:
    """1 + sqrt(D) * the largest arccos slope over the edges of the graph (see the error model)."""
    M, N, D = x64.shape
    cos = angular_adjacency_ref(x64, lengths, scale=1.0, normalize=False, layout="blocks")
    edges = cos > 0  # every edge has a positive weight
    c = torch.cos(math.pi * (1 - cos[edges]))  # back from the weight to the cosine
    slope = SCALE / (math.pi * torch.sqrt((1 - (SCALE * c) ** 2).clamp_min(1e-30)))
    return 1.0 + math.sqrt(max(D, 1)) * float(slope.max()) if slope.numel() else 1.0


def forward_tolerance(expected: torch.Tensor, cond: float, dtype) -> torch.Tensor:
    return C_FWD * acc_eps(dtype) * cond * float(expected.abs().max()) + out_eps(dtype) * expected.abs()


def grad_tolerance(expected: torch.Tensor, cond: float, dtype, num_edges_per_node: int) -> torch.Tensor:
    # A node's gradient sums its edges' contributions: their rounding errors add up (sqrt of their count).
    rel = C_GRAD * acc_eps(dtype) * cond * math.sqrt(num_edges_per_node)
    return rel * float(expected.abs().max()) + out_eps(dtype) * expected.abs()


def check_forward(x, lengths, **kwargs) -> torch.Tensor:
    out = angular_adjacency(x, lengths, **kwargs)
    x64 = as_float64_cpu(x)
    expected = angular_adjacency_ref(x64, lengths, **kwargs)
    assert out.dtype == x.dtype and out.device == x.device
    tol = forward_tolerance(expected, _condition(x64, lengths), x.dtype)
    assert_within(out, expected, tol, f"forward {kwargs}")
    return out


def check_grads(x, lengths, **kwargs) -> None:
    out = angular_adjacency(x, lengths, **kwargs)
    gen = torch.Generator().manual_seed(1)
    # Rounded to the dtype first: the reference sees exactly the cotangent the op saw.
    cotangent = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype).double()
    (grad,) = torch.autograd.grad(out, x, cotangent.to(device=out.device, dtype=out.dtype))
    x64 = as_float64_cpu(x, requires_grad=True)
    expected_out = angular_adjacency_ref(x64, lengths, **kwargs)
    (expected,) = torch.autograd.grad(expected_out, x64, cotangent)
    assert grad.dtype == x.dtype and grad.shape == x.shape and grad.device == x.device
    M = x.shape[0]
    window = kwargs.get("window")
    edges = (int(lengths.max()) if window is None else 2 * window + 1) + M
    tol = grad_tolerance(expected, _condition(x64.detach(), lengths), x.dtype, edges)
    assert_within(grad, expected, tol, f"grad {kwargs}")


# ---- parity with the float64 reference ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(case, dtype, layout, device):
    x, lengths = sample_inputs(CASES[case], device, dtype)
    check_forward(x, lengths, layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", list(CASES))
def test_grads_match_reference(case, dtype, layout, device):
    x, lengths = sample_inputs(CASES[case], device, dtype, requires_grad=True)
    check_grads(x, lengths, layout=layout)


@pytest.mark.parametrize("window", [None, 0, 1, 3])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_options_match_reference(dtype, layout, normalize, window, device):
    x, lengths = sample_inputs((3, [6, 1, 9, 4], 11), device, dtype, requires_grad=True)
    options = dict(layout=layout, normalize=normalize, window=window, scale=0.9 if window == 3 else SCALE)
    check_forward(x.detach(), lengths, **options)
    check_grads(x, lengths, **options)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_iemocap_batch_matches_reference(dtype, layout, device):
    x, lengths = sample_inputs(IEMOCAP, device, dtype, requires_grad=True)
    check_forward(x.detach(), lengths, layout=layout)
    check_grads(x, lengths, layout=layout)


@pytest.mark.parametrize("layout", ["utterance-major", "feature-step", "transposed"])
def test_strided_inputs_match_reference(layout, device):
    x, lengths = sample_inputs(CASES["odd"], device, torch.float32, layout=layout, requires_grad=True)
    assert not x.is_contiguous()
    for adjacency_layout in LAYOUTS:
        check_forward(x.detach(), lengths, layout=adjacency_layout)
        check_grads(x, lengths, layout=adjacency_layout)
    # lengths as a strided view too
    padded_lengths = torch.zeros(8, dtype=torch.int64)
    padded_lengths[::2] = lengths
    check_forward(x.detach(), padded_lengths[::2])


def test_large_window_equals_no_window(device):
    x, lengths = sample_inputs(CASES["odd"], device, torch.float64)
    for layout in LAYOUTS:
        full = angular_adjacency(x, lengths, layout=layout)
        assert torch.equal(angular_adjacency(x, lengths, layout=layout, window=int(lengths.max()) - 1), full)
        assert torch.equal(angular_adjacency(x, lengths, layout=layout, window=10**9), full)
        # i + window + 1 overflowed int64 here (the result differed from window=None by 0.42); a window beyond int64
        # is the same "every pair".
        assert torch.equal(angular_adjacency(x, lengths, layout=layout, window=2**63 - 1), full)
        assert torch.equal(angular_adjacency(x, lengths, layout=layout, window=2**63 - 2), full)
        assert torch.equal(angular_adjacency(x, lengths, layout=layout, window=2**70), full)
        assert torch.equal(angular_adjacency(x, lengths, layout=layout, window=x.shape[1]), full)
    (g_none,) = torch.autograd.grad(angular_adjacency(x.requires_grad_(), lengths).sum(), x)
    (g_huge,) = torch.autograd.grad(angular_adjacency(x, lengths, window=2**63 - 1).sum(), x)
    assert torch.equal(g_huge, g_none)


def test_window_zero_keeps_self_loops_and_cross_edges(device):
    x, lengths = sample_inputs((2, [3, 2], 4), device, torch.float64)
    a = angular_adjacency(x, lengths, window=0, normalize=False).cpu()
    N = 5
    self_weight = 1 - math.acos(SCALE) / math.pi
    assert torch.allclose(a.diagonal(), torch.full((2 * N,), self_weight, dtype=torch.float64))
    intra = a[:N, :N] - torch.diag(a[:N, :N].diagonal())
    assert torch.count_nonzero(intra) == 0
    assert torch.count_nonzero(a[:N, N:] - torch.diag(a[:N, N:].diagonal())) == 0
    assert (a[:N, N:].diagonal() > 0).all()


# ---- structure: blocks vs dense, symmetry, zeros, padding -------------------------------------------------------


def _dialogue_nodes(lengths: list[int], M: int) -> list[torch.Tensor]:
    N = sum(lengths)
    nodes, start = [], 0
    for length in lengths:
        nodes.append(torch.cat([torch.arange(start, start + length) + m * N for m in range(M)]))
        start += length
    return nodes


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
@pytest.mark.parametrize("case", ["mixed-1", "odd", "four-modalities"])
def test_blocks_are_the_dense_rows_and_columns(case, normalize, dtype, device):
    M, lengths, _ = CASES[case]
    x, lengths_t = sample_inputs(CASES[case], device, dtype)
    dense = angular_adjacency(x, lengths_t, normalize=normalize).cpu()
    blocks = angular_adjacency(x, lengths_t, normalize=normalize, layout="blocks").cpu()
    l_max = max(lengths)
    assert blocks.shape == (len(lengths), M * l_max, M * l_max)
    for g, (length, nodes) in enumerate(zip(lengths, _dialogue_nodes(lengths, M))):
        slots = torch.cat([torch.arange(length) + m * l_max for m in range(M)])
        block = blocks[g]
        assert torch.equal(block[slots][:, slots], dense[nodes][:, nodes]), f"dialogue {g}"
        padding = torch.ones(M * l_max, dtype=torch.bool)
        padding[slots] = False
        assert torch.count_nonzero(block[padding]) == 0 and torch.count_nonzero(block[:, padding]) == 0
        # Edges never leave the dialogue: its rows of the dense matrix are zero elsewhere.
        others = torch.ones(dense.shape[0], dtype=torch.bool)
        others[nodes] = False
        assert torch.count_nonzero(dense[nodes][:, others]) == 0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_exactly_symmetric(dtype, layout, device):
    x, lengths = sample_inputs(CASES["odd"], device, dtype)
    for window in (None, 1):
        a = angular_adjacency(x, lengths, layout=layout, window=window)
        assert torch.equal(a, a.transpose(-1, -2))


def test_normalized_spectrum_tops_at_one(device):
    # D^-1/2 A D^-1/2 has the same spectrum as the random-walk matrix D^-1 A, whose rows sum to 1: its largest
    # eigenvalue is exactly 1.
    x, lengths = sample_inputs(CASES["odd"], device, torch.float64)
    a = angular_adjacency(x, lengths).cpu()
    assert torch.linalg.eigvalsh(a).max().item() == pytest.approx(1.0, abs=1e-12)


# ---- the MMGCN-style loop and MMGCN's anchors ------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
def test_matches_mmgcn_loop(normalize, window, device):
    x, lengths = sample_inputs((3, [5, 1, 8, 3], 12), device, torch.float64)
    ours = angular_adjacency(x, lengths, normalize=normalize, window=window).cpu()
    loop = angular_adjacency_mmgcn_loop(x.cpu(), lengths, normalize=normalize, window=window)
    torch.testing.assert_close(ours, loop, rtol=1e-12, atol=1e-14)
    ref = angular_adjacency_ref(x.cpu(), lengths, normalize=normalize, window=window)
    torch.testing.assert_close(ref, loop, rtol=1e-12, atol=1e-14)


def test_mmgcn_loop_gradients_match(device):
    x, lengths = sample_inputs((2, [4, 3], 6), device, torch.float64, requires_grad=True)
    x_loop = x.detach().cpu().requires_grad_()
    out = angular_adjacency(x, lengths)
    loop = angular_adjacency_mmgcn_loop(x_loop, lengths)
    cot = torch.randn(out.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, x, cot.to(device))
    (g_loop,) = torch.autograd.grad(loop, x_loop, cot)
    torch.testing.assert_close(g.cpu(), g_loop, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_spec_anchors(dtype, device):
    # From MMGCN's graph construction (github.com/hujingwen6666/MMGCN): before normalisation, self-loop 0.998576, orthogonal 0.5, opposite 0.001424.
    x = torch.tensor([[[3.0, 0.0], [0.0, 2.0], [-0.5, 0.0]]], device=device, dtype=dtype)
    a = angular_adjacency(x, torch.tensor([3]), normalize=False).double().cpu()
    # The anchors carry 6 decimals (rounding: up to 5e-7), then the output dtype's rounding.
    tol = 2 * out_eps(dtype) if dtype in (torch.float16, torch.bfloat16) else 1e-6
    assert a[0, 0].item() == pytest.approx(0.998576, abs=tol)
    assert a[0, 1].item() == pytest.approx(0.5, abs=tol)
    assert a[0, 2].item() == pytest.approx(0.001424, abs=max(tol * 0.01, 1e-6))
    assert a[1, 2].item() == pytest.approx(0.5, abs=tol)


def test_spec_anchor_values_are_exact_to_six_digits():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]], dtype=torch.float64)
    a = angular_adjacency(x, torch.tensor([3]), normalize=False)
    assert round(a[0, 0].item(), 6) == 0.998576
    assert a[0, 1].item() == 0.5
    assert round(a[0, 2].item(), 6) == 0.001424


# ---- scale invariance ----------------------------------------------------------------------------------------------

# Feature scales where sum x^2 overflows or underflows without the per-row scaling (float32: ~1e19 and ~1e-19).
SCALES = {
    torch.float32: [1e-30, 1e-25, 1e-20, 1e-10, 1e10, 1e19, 1e20, 1e25, 1e30],
    torch.float64: [1e-300, 1e-200, 1e-160, 1e-100, 1e100, 1e160, 1e200, 1e300],
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_scale_invariance(dtype, layout, device):
    # Cosines do not depend on the scale of the features: at 1e19 (float32) the norms overflowed, every cosine became
    # 0 and the graph differed by 0.19 from the graph at scale 1. The gradient scales as 1 / s.
    M, lengths, D = CASES["odd"]
    values = _values(M, sum(lengths), D)
    values[1, 4] = 0.0  # a zero vector keeps its conventions at every scale: weight 0.5, gradient 0
    lengths_t = torch.tensor(lengths)
    x1 = values.to(device=device, dtype=dtype).requires_grad_()
    out1 = angular_adjacency(x1, lengths_t, layout=layout)
    cot = torch.randn(out1.shape, dtype=torch.float64).to(device=device, dtype=dtype)
    (g1,) = torch.autograd.grad(out1, x1, cot)
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    for scale in SCALES[dtype]:
        xs = (values * scale).to(device=device, dtype=dtype).requires_grad_()
        out = angular_adjacency(xs, lengths_t, layout=layout)
        torch.testing.assert_close(out, out1, rtol=0, atol=rtol, msg=f"scale {scale}")
        (g,) = torch.autograd.grad(out, xs, cot)
        assert torch.isfinite(g).all(), f"scale {scale}"
        assert (g[1, 4] == 0).all(), f"scale {scale}"
        # g * scale in float64: g itself may be ~1e30 (scale 1e-30) or ~1e-30 (scale 1e30).
        torch.testing.assert_close(g.double() * scale, g1.double(), rtol=0,
                                   atol=rtol * float(g1.double().abs().max()), msg=f"scale {scale}")


def test_reference_is_scale_invariant():
    M, lengths, D = CASES["odd"]
    x = _values(M, sum(lengths), D).float()
    lengths_t = torch.tensor(lengths)
    expected = angular_adjacency_ref(x, lengths_t)
    for scale in SCALES[torch.float32]:
        torch.testing.assert_close(angular_adjacency_ref(x * scale, lengths_t), expected, rtol=0, atol=1e-5)


# ---- zero vectors and scale = 1 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_zero_vectors(dtype, layout, device):
    # A zero feature vector has cosine 0 with everything, itself included: weight 0.5, a zero gradient, no NaN.
    x64 = _values(3, 6, 5)
    x64[0, 1] = 0.0  # a zero vector in modality 0
    x64[:, 4] = 0.0  # an utterance that is zero in every modality
    x = x64.to(device=device, dtype=dtype).requires_grad_()
    lengths = torch.tensor([2, 4])
    raw = angular_adjacency(x, lengths, normalize=False).double().cpu()
    assert raw[1, 1].item() == 0.5 and raw[4, 4].item() == 0.5
    assert raw[1, 0].item() == 0.5 and raw[1, 6 + 1].item() == 0.5
    out = angular_adjacency(x, lengths, layout=layout)
    assert torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out, x, torch.randn_like(out))
    assert torch.isfinite(grad).all()
    assert torch.count_nonzero(grad[0, 1]) == 0 and torch.count_nonzero(grad[:, 4]) == 0
    check_forward(x.detach(), lengths, layout=layout)
    check_grads(x, lengths, layout=layout)


def test_all_zero_features(device):
    x = torch.zeros(3, 5, 4, device=device, requires_grad=True)
    out = angular_adjacency(x, torch.tensor([2, 3]), layout="blocks")
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(out).all() and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_scale_one_gives_exact_weights_and_finite_gradients(dtype, device):
    # Identical and opposite vectors: arccos(+-1) has an infinite slope; the weights are exact (1 and 0) and the
    # gradient stays finite (1 - t^2 is floored at 1e-12, documented).
    x64 = _values(2, 4, 3)
    x64[1, 2] = 2 * x64[0, 2]  # parallel across modalities
    x64[0, 3] = -x64[0, 0]  # opposite within modality 0
    x = x64.to(device=device, dtype=dtype).requires_grad_()
    lengths = torch.tensor([4])
    raw = angular_adjacency(x, lengths, scale=1.0, normalize=False).cpu().double()
    assert raw[0, 0].item() == 1.0
    assert raw[2, 4 + 2].item() == pytest.approx(1.0, abs=1e-3 if dtype == torch.float32 else 1e-7)
    assert raw[0, 3].item() == pytest.approx(0.0, abs=1e-3 if dtype == torch.float32 else 1e-7)
    for layout in LAYOUTS:
        out = angular_adjacency(x, lengths, scale=1.0, layout=layout)
        (grad,) = torch.autograd.grad(out, x, torch.randn_like(out))
        assert torch.isfinite(grad).all()


# ---- block_graph_propagate ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("case", ["one-dialogue", "mixed-1", "four-modalities", "one-modality"])
def test_block_graph_propagate_matches_dense(case, dtype, device):
    M, lengths, _ = CASES[case]
    x, lengths_t = sample_inputs(CASES[case], device, dtype)
    blocks = angular_adjacency(x, lengths_t, layout="blocks")
    dense = angular_adjacency(x, lengths_t)
    h = torch.randn(M * sum(lengths), 7, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    blocks = blocks.detach().requires_grad_()
    out = block_graph_propagate(blocks, h, lengths_t, M)
    expected = dense @ h
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.cpu(), block_graph_propagate_ref(blocks.cpu(), h.cpu(), lengths_t, M))
    cot = torch.randn_like(out)
    g_blocks, g_h = torch.autograd.grad(out, (blocks, h), cot)
    b64, h64 = blocks.detach().cpu().double().requires_grad_(), h.detach().cpu().double().requires_grad_()
    r_out = block_graph_propagate_ref(b64, h64, lengths_t, M)
    r_blocks, r_h = torch.autograd.grad(r_out, (b64, h64), cot.cpu().double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(g_blocks.cpu().double(), r_blocks, **tol)
    torch.testing.assert_close(g_h.cpu().double(), r_h, **tol)


def test_block_graph_propagate_ignores_padding_values(device):
    x, lengths = sample_inputs(CASES["mixed-1"], device, torch.float64)
    blocks = angular_adjacency(x, lengths, layout="blocks")
    h = torch.randn(2 * 9, 3, dtype=torch.float64, device=device)
    noisy = torch.where(blocks == 0, torch.full_like(blocks, 123.0), blocks)  # garbage in the padding only
    # (zeros also sit outside the padding: the cross-modal blocks off their diagonal; those must stay zero)
    M, l_max = 2, 5
    pad = torch.ones(M * l_max, dtype=torch.bool)
    for g, length in enumerate([1, 5, 1, 2]):
        slots = torch.cat([torch.arange(length) + m * l_max for m in range(M)])
        mask = torch.ones(M * l_max, M * l_max, dtype=torch.bool)
        mask[slots[:, None], slots[None, :]] = False
        noisy[g][~mask.to(device)] = blocks[g][~mask.to(device)]
    assert pad.any()
    torch.testing.assert_close(block_graph_propagate(noisy, h, lengths, M),
                               block_graph_propagate(blocks, h, lengths, M))


def test_block_graph_propagate_lengths_on_device_or_cpu(device):
    x, lengths = sample_inputs(CASES["odd"], device, torch.float32)
    blocks = angular_adjacency(x, lengths.to(device), layout="blocks")
    h = torch.randn(3 * 11, 4, device=device)
    on_device = block_graph_propagate(blocks, h, lengths.to(device), 3)
    torch.testing.assert_close(block_graph_propagate(blocks, h, lengths, 3), on_device)


# ---- opcheck: schemas, fake kernels, autograd registration, AOT dispatch -------------------------------------------

OPS = ["angular_adjacency", "_angular_adjacency_forward", "_angular_adjacency_backward", "block_graph_propagate",
       "_block_graph_outer"]


def _opcheck_cases(device):
    def feats(requires_grad=False):
        x, lengths = sample_inputs(CASES["odd"], device, torch.float32, requires_grad=requires_grad)
        return x, lengths

    cases = []
    for rg in (False, True):
        tag = "grad" if rg else "nograd"
        for layout in LAYOUTS:
            x, lengths = feats(rg)
            cases.append((f"angular_adjacency-{layout}-{tag}", ops.angular_adjacency, (x, lengths),
                          dict(layout=layout, window=1 if rg else None)))
            cases.append((f"_angular_adjacency_forward-{layout}-{tag}", ops._angular_adjacency_forward,
                          (x, lengths, SCALE, True, None, layout), {}))
        x, lengths = feats()
        blocks = angular_adjacency(x, lengths, layout="blocks").requires_grad_(rg)
        h = torch.randn(3 * 11, 5, device=device, requires_grad=rg)
        cases.append((f"block_graph_propagate-{tag}", ops.block_graph_propagate, (blocks, h, lengths, 3), {}))
        a = torch.randn(3 * 11, 5, device=device, requires_grad=rg)
        cases.append((f"_block_graph_outer-{tag}", ops._block_graph_outer, (a, h, lengths, 3, blocks.shape[1]), {}))
    for layout in LAYOUTS:
        x, lengths = feats()
        out, stats = ops._angular_adjacency_forward(x, lengths, SCALE, False, 2, layout)
        cases.append((f"_angular_adjacency_backward-{layout}", ops._angular_adjacency_backward,
                      (torch.randn_like(out), x, lengths, stats, SCALE, False, 2, layout), {}))
    return cases


_OPCHECK_NAMES = [name for name, *_ in _opcheck_cases("cpu")]


@pytest.mark.parametrize("case", _OPCHECK_NAMES)
def test_opcheck(case, device):
    cases = {name: (op, args, kwargs) for name, op, args, kwargs in _opcheck_cases(device)}
    op, args, kwargs = cases[case]
    torch.library.opcheck(op, args, kwargs)


def test_opcheck_covers_every_op_of_the_family():
    # A new op registered from this family's module (set_python_module) must get an opcheck case above, and every
    # op of the library must belong to some family module (whose test file checks it the same way).
    tested = {name.split("-")[0] for name in _OPCHECK_NAMES}
    assert tested == set(OPS)
    modules = {
        s.name.split("::")[1]: (torch._C._dispatch_pystub(s.name, s.overload_name) or (None,))[0]
        for s in torch._C._jit_get_all_schemas()
        if s.name.startswith("mmer_ext::")
    }
    assert {name for name, module in modules.items() if module == "mmer_ext.ops.angular_adjacency"} == set(OPS)
    assert all(module is not None and module.startswith("mmer_ext.ops.") for module in modules.values()), modules


# ---- gradcheck ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 1])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(layout, normalize, window):
    x, lengths = sample_inputs((3, [3, 1, 4], 4), "cpu", torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v: angular_adjacency(v, lengths, layout=layout, normalize=normalize, window=window), (x,)
    )


def test_gradcheck_block_graph_propagate():
    x, lengths = sample_inputs((2, [3, 1, 2], 4), "cpu", torch.float64)
    blocks = angular_adjacency(x, lengths, layout="blocks").requires_grad_()
    h = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b, v: block_graph_propagate(b, v, lengths, 2), (blocks, h))
    assert torch.autograd.gradgradcheck(lambda b, v: block_graph_propagate(b, v, lengths, 2), (blocks, h))
    a = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, q: ops._block_graph_outer(p, q, lengths, 2, blocks.shape[1]), (a, h))


def test_gradcheck_through_propagate():
    # The GCN path: features -> blocks adjacency -> A @ h, differentiated w.r.t. both.
    x, lengths = sample_inputs((3, [2, 3], 4), "cpu", torch.float64, requires_grad=True)
    h = torch.randn(15, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, w: block_graph_propagate(angular_adjacency(v, lengths, layout="blocks"), w, lengths, 3), (x, h)
    )


def test_double_backward_is_refused():
    x, lengths = sample_inputs(CASES["odd"], "cpu", torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(angular_adjacency(x, lengths).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"second derivatives are not implemented"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.autograd.grad(g.square().sum(), x)


# ---- torch.compile --------------------------------------------------------------------------------------------------


def _gcn_step(x, lengths, h, weights):
    dense = angular_adjacency(x, lengths, window=2)
    blocks = angular_adjacency(x, lengths, layout="blocks")
    return (dense * weights).sum() + block_graph_propagate(blocks, h, lengths, x.shape[0]).square().sum()


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_matches_eager(dynamic):
    compiled = torch.compile(_gcn_step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for case in ("odd", "mixed-1"):
        M, lengths_list, _ = CASES[case]
        x, lengths = sample_inputs(CASES[case], "cpu", torch.float32, requires_grad=True)
        h = torch.randn(M * sum(lengths_list), 3, requires_grad=True)
        weights = torch.randn(M * sum(lengths_list), M * sum(lengths_list))
        out = compiled(x, lengths, h, weights)
        grads = torch.autograd.grad(out, (x, h))
        expected = _gcn_step(x, lengths, h, weights)
        expected_grads = torch.autograd.grad(expected, (x, h))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_inductor_fullgraph():
    # Inductor itself (not just the AOT trace): the ops stay opaque nodes around inductor-generated glue.
    compiled = torch.compile(_gcn_step, fullgraph=True)
    M, lengths_list, _ = CASES["odd"]
    x, lengths = sample_inputs(CASES["odd"], "cpu", torch.float32, requires_grad=True)
    h = torch.randn(M * sum(lengths_list), 3, requires_grad=True)
    weights = torch.randn(M * sum(lengths_list), M * sum(lengths_list))
    out = compiled(x, lengths, h, weights)
    out.backward()
    torch.testing.assert_close(out, _gcn_step(x, lengths, h, weights), rtol=1e-5, atol=1e-5)


# ---- determinism and threads -----------------------------------------------------------------------------------------


def _outputs_and_grads(x, lengths):
    x = x.detach().clone().requires_grad_()
    results = []
    for layout in LAYOUTS:
        out = angular_adjacency(x, lengths, layout=layout)
        results += [out, *torch.autograd.grad(out, x, torch.ones_like(out))]
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_thread_count_does_not_change_bits(dtype):
    x, lengths = sample_inputs((3, [30, 7, 55, 12, 1, 41], 33), "cpu", dtype)
    torch.set_num_threads(1)  # the autouse fixture restores the count
    one = _outputs_and_grads(x, lengths)
    torch.set_num_threads(2)
    two = _outputs_and_grads(x, lengths)
    for i, (a, b) in enumerate(zip(one, two)):
        assert torch.equal(a, b), f"result {i} differs between 1 and 2 threads"


def test_repeat_runs_are_bitwise_identical(device):
    x, lengths = sample_inputs((3, [30, 7, 55], 33), device, torch.float32)
    for a, b in zip(_outputs_and_grads(x, lengths), _outputs_and_grads(x, lengths)):
        assert torch.equal(a, b)


# ---- shapes and argument errors --------------------------------------------------------------------------------------


def test_empty_batch(device):
    x = torch.empty(3, 0, 4, device=device)
    lengths = torch.empty(0, dtype=torch.int64)
    assert angular_adjacency(x, lengths).shape == (0, 0)
    assert angular_adjacency(x, lengths, layout="blocks").shape == (0, 0, 0)


def test_meta_tensors_give_shapes():
    x = torch.empty(3, 11, 5, device="meta")
    lengths = torch.empty(4, dtype=torch.int64, device="meta")
    assert angular_adjacency(x, lengths).shape == (33, 33)
    assert block_graph_propagate(torch.empty(4, 15, 15, device="meta"), torch.empty(33, 6, device="meta"),
                                 lengths, 3).shape == (33, 6)


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(lengths=torch.tensor([3, 3])), r"lengths sum to 6 but features holds N = 7 utterances"),
        (dict(lengths=torch.tensor([3, 0, 4])), r"lengths\[1\] is 0; every dialogue needs at least one utterance"),
        (dict(lengths=torch.tensor([8, -1])), r"lengths\[1\] is -1"),
        (dict(lengths=torch.tensor([3, 4], dtype=torch.int32)), r"lengths must be int64, got Int"),
        (dict(lengths=torch.tensor([3.0, 4.0])), r"lengths must be int64, got Float"),
        (dict(lengths=torch.tensor([[3, 4]])), r"lengths must be a 1-d tensor \[dialogues G\]"),
        (dict(features=_x(0, 7, 5)), r"features has no modality .*; M must be >= 1"),
        (dict(features=_x(7, 5)), r"features must be a 3-d tensor \[modalities M, utterances N, feature dim D\]"),
        (dict(features=torch.ones(2, 7, 5, dtype=torch.int64)), r"features must be float32, float64, float16 or"),
        (dict(window=-1), r"window must be None or >= 0 \(0 keeps the self-loops only\), got -1"),
        (dict(layout="sparse"), r"layout must be \"dense\" or \"blocks\", got \"sparse\""),
        (dict(scale=0.0), r"scale must be in \(0, 1\] \(MMGCN uses 0.99999\), got 0"),
        (dict(scale=1.5), r"scale must be in \(0, 1\]"),
    ],
    ids=["sum", "zero-length", "negative-length", "int32-lengths", "float-lengths", "2d-lengths", "M0", "2d-features",
         "int-features", "window", "layout", "scale0", "scale>1"],
)
def test_bad_arguments(kwargs, pattern):
    args = dict(features=_x(2, 7, 5), lengths=torch.tensor([3, 4]))
    args.update(kwargs)
    features, lengths = args.pop("features"), args.pop("lengths")
    with pytest.raises(RuntimeError, match=r"angular_adjacency: " + pattern):
        angular_adjacency(features, lengths, **args)


def test_lengths_on_another_device_are_rejected():
    with pytest.raises(RuntimeError, match=r"lengths is on meta but features is on cpu"):
        angular_adjacency(_x(2, 7, 5), torch.empty(2, dtype=torch.int64, device="meta"))


def test_block_graph_propagate_bad_arguments():
    x, lengths = sample_inputs(CASES["odd"], "cpu", torch.float32)
    blocks = angular_adjacency(x, lengths, layout="blocks")
    h = torch.randn(33, 4)
    with pytest.raises(RuntimeError, match=r"x has 32 rows \(nodes\), not a multiple M \* N of num_modalities M = 3"):
        block_graph_propagate(blocks, h[:32], lengths, 3)
    with pytest.raises(RuntimeError, match=r"blocks have 15 slots per dialogue but M \* Lmax = 3 \* 6 = 18"):
        block_graph_propagate(blocks, h, torch.tensor([3, 1, 6, 1]), 3)
    with pytest.raises(RuntimeError, match=r"blocks hold 4 dialogues but lengths has 3"):
        block_graph_propagate(blocks, h, torch.tensor([3, 3, 5]), 3)
    with pytest.raises(RuntimeError, match=r"x has dtype Double but blocks has Float"):
        block_graph_propagate(blocks, h.double(), lengths, 3)
    with pytest.raises(RuntimeError, match=r"blocks must be \[G, M \* Lmax, M \* Lmax\]"):
        block_graph_propagate(blocks[:, :, :14], h, lengths, 3)
    with pytest.raises(RuntimeError, match=r"lengths\[0\] is 0"):
        block_graph_propagate(blocks, h, torch.tensor([0, 6, 5, 0]), 3)
    with pytest.raises(RuntimeError, match=r"block_graph_propagate: num_modalities must be >= 1, got 0"):
        block_graph_propagate(blocks, h, lengths, 0)
    with pytest.raises(RuntimeError, match=r"lengths sum to 10 but x \(rows / num_modalities\) holds N = 11"):
        block_graph_propagate(blocks, h, torch.tensor([3, 1, 4, 2]), 3)
    with pytest.raises(TypeError, match=r"block_graph_propagate: num_modalities must be an int, got float"):
        block_graph_propagate(blocks, h, lengths, 3.0)


def test_block_graph_propagate_rejects_lengths_that_fit_another_modality_count():
    # 12 nodes as 3 modalities of 4 utterances (lengths [2, 2]): blocks [2, 6, 6]. lengths [3, 3] reads the same rows
    # as 2 modalities of 6 utterances, also with 6 slots per dialogue; inferring M from rows / sum(lengths) accepted
    # it and mixed up the nodes.
    x = torch.randn(3, 4, 5)
    blocks = angular_adjacency(x, torch.tensor([2, 2]), layout="blocks")
    h = torch.randn(12, 3)
    expected = angular_adjacency(x, torch.tensor([2, 2])) @ h
    torch.testing.assert_close(block_graph_propagate(blocks, h, torch.tensor([2, 2]), 3), expected)
    with pytest.raises(RuntimeError, match=r"lengths\[1\] is 3 but x \(rows / num_modalities\) holds N = 4 "
                                           r"utterances and lengths\[:1\] already take 3"):
        block_graph_propagate(blocks, h, torch.tensor([3, 3]), 3)
    with pytest.raises(RuntimeError, match=r"blocks have 6 slots per dialogue but M \* Lmax = 2 \* 2 = 4"):
        block_graph_propagate(blocks, h, torch.tensor([2, 2, 2]), 2)


@pytest.mark.parametrize("op", ["angular_adjacency", "block_graph_propagate"])
def test_lengths_whose_sum_wraps_are_rejected(op):
    # 2^62 * 4 + 11 wraps to 11 in int64: a plain sum passed the check and failed later with an internal error.
    huge = 2**62
    lengths = torch.tensor([huge, huge, huge, huge, 3, 1, 5, 2])
    x, good = sample_inputs(CASES["odd"], "cpu", torch.float32)
    assert int(lengths.sum()) == int(good.sum())
    with pytest.raises(RuntimeError, match=rf"{op}: lengths\[0\] is {huge} but .* holds N = 11 utterances"):
        if op == "angular_adjacency":
            angular_adjacency(x, lengths)
        else:
            blocks = angular_adjacency(x, good, layout="blocks")
            block_graph_propagate(blocks, torch.randn(33, 4), lengths, 3)


def test_backward_op_checks_its_arguments():
    x, lengths = sample_inputs(CASES["odd"], "cpu", torch.float32)
    out, stats = ops._angular_adjacency_forward(x, lengths, SCALE, True, None, "dense")
    with pytest.raises(RuntimeError, match=r"_angular_adjacency_backward: grad must be \[33, 33\]"):
        ops._angular_adjacency_backward(out[:32], x, lengths, stats, SCALE, True, None, "dense")
    with pytest.raises(RuntimeError, match=r"_angular_adjacency_backward: grad must be \[4, 15, 15\]"):
        ops._angular_adjacency_backward(out, x, lengths, stats, SCALE, True, None, "blocks")
    with pytest.raises(RuntimeError, match=r"_angular_adjacency_backward: stats must be \[2, 3, 11\]"):
        ops._angular_adjacency_backward(out, x, lengths, stats[:1], SCALE, True, None, "dense")


@cuda_only
def test_features_and_lengths_on_cuda_or_cpu():
    x, lengths = sample_inputs(CASES["odd"], "cuda", torch.float32)
    torch.testing.assert_close(angular_adjacency(x, lengths), angular_adjacency(x, lengths.cuda()))
    with pytest.raises(RuntimeError, match=r"lengths is on cuda(:0)? but features is on cpu"):
        angular_adjacency(x.cpu(), lengths.cuda())


# ---- CUDA only ------------------------------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_cuda_matches_cpu(dtype, layout):
    x_cpu, lengths = sample_inputs(IEMOCAP, "cpu", dtype, requires_grad=True)
    x_gpu = x_cpu.detach().cuda().requires_grad_()
    out_cpu = angular_adjacency(x_cpu, lengths, layout=layout)
    out_gpu = angular_adjacency(x_gpu, lengths, layout=layout)
    x64 = as_float64_cpu(x_cpu)
    expected = angular_adjacency_ref(x64, lengths, layout=layout)
    tol = 2 * forward_tolerance(expected, _condition(x64, lengths), dtype)
    assert_within(out_gpu, out_cpu.double(), tol, "cuda vs cpu")
    cot = torch.randn(out_cpu.shape, dtype=torch.float64)
    (g_cpu,) = torch.autograd.grad(out_cpu, x_cpu, cot.to(dtype))
    (g_gpu,) = torch.autograd.grad(out_gpu, x_gpu, cot.to(dtype).cuda())
    torch.testing.assert_close(g_gpu.cpu().double(), g_cpu.double(), rtol=0,
                               atol=1e-3 * float(g_cpu.double().abs().max()) + 1e-6)


def test_ops_are_tagged_cudagraph_unsafe():
    # The kernels read the dialogue lengths on the host: a CUDA graph could not replay them with new lengths.
    for name in ["_angular_adjacency_forward", "_angular_adjacency_backward", "block_graph_propagate",
                 "_block_graph_outer"]:
        assert torch.Tag.cudagraph_unsafe in getattr(ops, name).default.tags, name
