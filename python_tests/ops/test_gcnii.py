"""Tests of the GCNII layer op: ``gcnii_layer`` (and its private backward op ``_gcnii_layer_backward``).

Oracle: ``gcnii_layer_ref`` of ``mmer_ext.ops._reference`` in float64 on the values the op saw; the in-kernel dropout
mask against ``gcnii_dropout_keep_ref`` (a pure-PyTorch Philox-4x32-10) keyed by the generator's next 64-bit draw,
which the CPU kernel takes as its key; and the mask's statistics (keep rate, independence of neighbours).
"""

from __future__ import annotations

import math

import pytest
import torch

import mmer_ext  # noqa: F401  (loads the compiled library; registers torch.ops.mmer_ext)
from mmer_ext.ops import gcnii_layer
from mmer_ext.ops._reference import gcnii_dropout_keep_ref, gcnii_layer_ref, philox4x32_10_ref
from op_testing import (ALL_DTYPES, as_float64_cpu, assert_within, cuda_only, dtype_id, next_cpu_key,
                        ops_registered_from, place)

ops = torch.ops.mmer_ext
THETA, ALPHA = math.log(0.5 / 3 + 1), 0.1  # MMGCN's third layer
SHAPES = [(0, 4), (1, 1), (1, 17), (7, 5), (33, 100), (2658, 100)]
LAYOUTS = ["contiguous", "transposed", "row_slice", "row_step", "col_step"]


def _inputs(n, f, device="cpu", dtype=torch.float32, seed=0, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    hi = torch.randn(n, f, generator=g, dtype=torch.float64)
    h0 = torch.randn(n, f, generator=g, dtype=torch.float64).relu()
    w = (torch.rand(2 * f, f, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(f)
    return [place(v, device, dtype, layout) for v in (hi, h0, w)]


def _tolerance(hi, h0, w, dtype):
    # Each output sums 2F products and three more terms; the GEMMs accumulate in the dtype (float32 for 16-bit
    # inputs on most back ends), then the result is rounded to the dtype.
    f = hi.shape[1]
    scale = (hi.abs() @ w[:f].abs() + h0.abs() @ w[f:].abs()) * THETA + hi.abs() + h0.abs()
    acc = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    rounding = torch.finfo(dtype).eps
    return scale * (4 * (2 * f + 4) * acc + 2 * rounding) + torch.finfo(dtype).tiny


# ---- forward and backward against the reference ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_forward_matches_reference(shape, dtype, device):
    hi, h0, w = _inputs(*shape, device=device, dtype=dtype)
    out = gcnii_layer(hi, h0, w, THETA, ALPHA)
    r = [as_float64_cpu(v) for v in (hi, h0, w)]
    assert out.dtype == dtype and out.device == hi.device and out.shape == hi.shape
    assert_within(out, gcnii_layer_ref(*r, THETA, ALPHA), _tolerance(*r, dtype), "gcnii_layer")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_inputs_match_reference(layout, dtype, device):
    hi, h0, w = _inputs(9, 6, device=device, dtype=dtype, layout=layout)
    r = [as_float64_cpu(v) for v in (hi, h0, w)]
    assert_within(gcnii_layer(hi, h0, w, THETA, ALPHA), gcnii_layer_ref(*r, THETA, ALPHA), _tolerance(*r, dtype),
                  f"gcnii_layer ({layout})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (300, 32)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_grads_match_reference(shape, dropout, dtype, device):
    hi, h0, w = [v.requires_grad_() for v in _inputs(*shape, device=device, dtype=dtype, seed=3)]
    out = gcnii_layer(hi, h0, w, THETA, ALPHA, dropout)
    # The mask the op drew, read off its output: an element is kept iff it is non-zero where relu is positive.
    r = [as_float64_cpu(v, requires_grad=True) for v in (hi, h0, w)]
    pre = gcnii_layer_ref(*r, THETA, ALPHA).detach()
    keep = (out.detach().cpu() != 0) | (pre <= 0)
    expected = gcnii_layer_ref(*r, THETA, ALPHA, dropout, keep=keep if dropout else None)
    cot = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(out, (hi, h0, w), cot.to(device, dtype))
    want = torch.autograd.grad(expected, r, cot)
    for name, g, e in zip(("hi", "h0", "weight"), got, want):
        scale = e.abs().max().item() + 1.0
        tol = (1e-12 if dtype == torch.float64 else 2e-5) * scale * max(shape)
        assert_within(g, e, tol, f"d/d{name}")


def test_gradcheck_without_and_with_dropout():
    hi, h0, w = [v.requires_grad_() for v in _inputs(6, 4, dtype=torch.float64, seed=5)]
    assert torch.autograd.gradcheck(lambda a, b, c: gcnii_layer(a, b, c, THETA, ALPHA), (hi, h0, w))

    # A fresh generator per call: gradcheck's perturbed calls must see the same mask.
    def dropped(a, b, c):
        return gcnii_layer(a, b, c, THETA, ALPHA, 0.3, generator=torch.Generator().manual_seed(7))

    assert torch.autograd.gradcheck(dropped, (hi, h0, w))


def test_double_backward_is_refused():
    hi, h0, w = [v.requires_grad_() for v in _inputs(5, 3, dtype=torch.float64)]
    (g,) = torch.autograd.grad(gcnii_layer(hi, h0, w, THETA, ALPHA).sum(), (hi,), create_graph=True)
    with pytest.raises(RuntimeError, match=r"mmer_ext\.gcnii_layer: second derivatives are not implemented"):
        g.sum().backward()


# ---- the in-kernel dropout -----------------------------------------------------------------------------------------


def test_philox_reference_matches_the_published_test_vectors():
    # Random123's kat_vectors for philox4x32_10: (counter, key) -> output.
    cases = [
        ((0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF), 0xFFFFFFFFFFFFFFFF,
         (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        # counter words (0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), key words (0xa4093822, 0x299f31d0)
        ((0x85A308D3243F6A88, 0x0370734413198A2E), 0x299F31D0A4093822,
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for (lo, hi), key, expected in cases:
        hi_signed = hi - 2**64 if hi >= 2**63 else hi
        got = philox4x32_10_ref(lo, torch.tensor([hi_signed]), key)[0].tolist()
        assert got == list(expected)


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (33, 100), (2658, 100)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dropout", [0.1, 0.4, 0.9])
def test_cpu_mask_is_the_reference_philox_stream(shape, dropout):
    hi, h0, w = _inputs(*shape, seed=2)
    hi = hi.abs() + 1.0  # every pre-activation positive: the output is zero exactly where the mask drops
    g = torch.Generator().manual_seed(11)
    key = next_cpu_key(g)
    out = gcnii_layer(hi, h0, w.abs(), THETA, ALPHA, dropout, generator=g)
    keep = gcnii_dropout_keep_ref(key, shape, dropout)
    assert torch.equal(out != 0, keep)
    expected = gcnii_layer_ref(hi.double(), h0.double(), w.abs().double(), THETA, ALPHA, dropout, keep=keep)
    assert_within(out, expected, 1e-5 * expected.abs().max().item(), "dropped output")


@pytest.mark.parametrize("dropout", [0.05, 0.4, 0.75])
def test_keep_rate_and_neighbour_independence(dropout, device):
    n, f = 500, 200
    hi = torch.ones(n, f, device=device)
    w = torch.zeros(2 * f, f, device=device)
    torch.manual_seed(3)
    out = gcnii_layer(hi, torch.zeros_like(hi), w, 0.0, 0.0, dropout)
    kept = (out != 0).double().flatten().cpu()
    q = 1.0 - dropout
    sigma = math.sqrt(q * (1 - q) / kept.numel())
    assert abs(kept.mean().item() - q) < 5 * sigma  # binomial, 5 sigma
    assert torch.allclose(out[out != 0], torch.tensor(1.0 / q, device=device))  # inverted dropout: E[out] = relu
    # Neighbours share a Philox block (lags 1-3) or not (4, 5, 100): each pair's correlation must vanish.
    for lag in (1, 2, 3, 4, 5, 100):
        a, b = kept[:-lag] - q, kept[lag:] - q
        corr = (a * b).mean().item() / (q * (1 - q))
        assert abs(corr) < 5 / math.sqrt(a.numel()), f"lag {lag}: correlation {corr:.4f}"


def test_mask_follows_manual_seed_and_advances(device):
    hi, h0, w = _inputs(40, 8, device=device)
    hi = hi.abs() + 1.0
    w = w.abs()
    torch.manual_seed(0)
    a = gcnii_layer(hi, h0, w, THETA, ALPHA, 0.5)
    b = gcnii_layer(hi, h0, w, THETA, ALPHA, 0.5)
    torch.manual_seed(0)
    assert torch.equal(gcnii_layer(hi, h0, w, THETA, ALPHA, 0.5), a)
    assert not torch.equal(a != 0, b != 0)  # each call draws a new mask
    # Without dropout nothing is drawn: the generator does not advance.
    torch.manual_seed(0)
    gcnii_layer(hi, h0, w, THETA, ALPHA)
    assert torch.equal(gcnii_layer(hi, h0, w, THETA, ALPHA, 0.5), a)


def test_mask_does_not_depend_on_thread_count():
    hi, h0, w = _inputs(2658, 100)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(gcnii_layer(hi, h0, w, THETA, ALPHA, 0.4, generator=torch.Generator().manual_seed(4)))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(o != 0, outs[0] != 0) for o in outs[1:])


def test_eval_mode_model_is_deterministic_and_matches_module_path():
    # MMGCN with dropout_rng="philox" runs its layers through the op; in eval (no dropout) it must equal the module
    # path ("uniform") to rounding, layer for layer.
    from mmer_ext.data import collate_dialogues, make_synthetic_dialogues
    from mmer_ext.models import MMGCN

    train = make_synthetic_dialogues(seed=0)["train"]
    batch = collate_dialogues([train[i] for i in range(3)])
    torch.manual_seed(0)
    fused = MMGCN(train.dims, train.num_classes, num_speakers=train.num_speakers, num_layers=8).eval()
    modules = MMGCN(train.dims, train.num_classes, num_speakers=train.num_speakers, num_layers=8,
                    dropout_rng="uniform").eval()
    modules.load_state_dict(fused.state_dict())
    torch.testing.assert_close(fused(batch), modules(batch), rtol=1e-5, atol=1e-6)


# ---- registration: opcheck, compile, meta, errors -------------------------------------------------------------------


def _opcheck_cases(device):
    hi, h0, w = _inputs(7, 5, device=device)
    grads = [v.clone().requires_grad_() for v in (hi, h0, w)]
    out = gcnii_layer(hi, h0, w, THETA, ALPHA, 0.3, generator=torch.Generator(device).manual_seed(0))
    return [
        ("gcnii_layer-nograd", ops.gcnii_layer, (hi, h0, w, THETA, ALPHA)),
        ("gcnii_layer-grad", ops.gcnii_layer, (*grads, THETA, ALPHA)),
        # The forward with dropout draws a new mask on every call, and opcheck compares repeated calls: it is checked
        # without dropout here and by the mask tests below. The backward op is deterministic at any dropout.
        ("_gcnii_layer_backward", ops._gcnii_layer_backward,
         (torch.randn_like(out), out, hi, h0, w, THETA, ALPHA, 0.3)),
    ]


@pytest.mark.parametrize("case", ["gcnii_layer-nograd", "gcnii_layer-grad", "_gcnii_layer_backward"])
def test_opcheck(case, device):
    cases = {name: (op, args) for name, op, args in _opcheck_cases(device)}
    op, args = cases[case]
    torch.library.opcheck(op, args)


def test_opcheck_covers_every_op():
    tested = {name.split("-")[0] for name, _, _ in _opcheck_cases("cpu")}
    assert ops_registered_from("mmer_ext.ops.gcnii") == tested


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_matches_eager(dynamic):
    hi, h0, w = [v.requires_grad_() for v in _inputs(9, 6)]

    def two_layers(a, b, c):
        h = gcnii_layer(a, b, c, THETA, ALPHA, 0.2)
        return gcnii_layer(h, b, c, THETA / 2, ALPHA, 0.2).sum()

    compiled = torch.compile(two_layers, fullgraph=True, dynamic=dynamic)
    torch.manual_seed(5)
    got = compiled(hi, h0, w)
    g_got = torch.autograd.grad(got, (hi, h0, w))
    torch.manual_seed(5)
    want = two_layers(hi, h0, w)
    g_want = torch.autograd.grad(want, (hi, h0, w))
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_meta_tensors_give_shapes():
    hi, h0, w = [v.to("meta") for v in _inputs(7, 5)]
    out = gcnii_layer(hi, h0, w, THETA, ALPHA, 0.5)
    assert out.device.type == "meta" and out.shape == (7, 5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: {**a, "hi": a["hi"][0]}, "hi must be a 2-d tensor"),
        (lambda a: {**a, "h0": a["h0"][:3]}, "h0 has shape"),
        (lambda a: {**a, "weight": a["weight"][:5]}, r"weight must be \[2F, F\]"),
        (lambda a: {**a, "weight": a["weight"].double()}, "weight has dtype"),
        (lambda a: {**a, "hi": a["hi"].long(), "h0": a["h0"].long(), "weight": a["weight"].long()},
         "hi must be float32"),
        (lambda a: {**a, "dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        (lambda a: {**a, "dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        (lambda a: {**a, "theta": float("nan")}, "theta must be finite"),
        (lambda a: {**a, "alpha": float("inf")}, "alpha must be finite"),
        (lambda a: {**a, "theta": True}, "theta must be a float"),
        (lambda a: {**a, "hi": a["hi"].to_sparse()}, "hi must be a dense"),
    ],
)
def test_bad_arguments_are_named(change, message):
    hi, h0, w = _inputs(7, 5)
    args = change({"hi": hi, "h0": h0, "weight": w, "theta": THETA, "alpha": ALPHA, "dropout": 0.2})
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
        gcnii_layer(**args)


# ---- CUDA -----------------------------------------------------------------------------------------------------------


@cuda_only
def test_cuda_mask_is_the_reference_philox_stream_for_its_seed():
    # The CUDA kernel keys its mask with the generator's Philox seed and offset (offset / 4 is the block counter's low
    # word), the layout the CPU kernel uses with offset 0.
    hi, h0, w = _inputs(301, 7, device="cuda")
    hi, w = hi.abs() + 1.0, w.abs()
    g = torch.Generator("cuda").manual_seed(123)
    seed, offset = g.initial_seed(), g.get_offset()
    out = gcnii_layer(hi, h0, w, THETA, ALPHA, 0.35, generator=g)
    keep = gcnii_dropout_keep_ref(seed, out.shape, 0.35, counter_lo=offset // 4)
    assert torch.equal((out != 0).cpu(), keep)


@cuda_only
def test_cuda_graph_replay_draws_fresh_masks():
    hi, h0, w = _inputs(64, 16, device="cuda")
    hi, w = hi.abs() + 1.0, w.abs()
    static = gcnii_layer(hi, h0, w, THETA, ALPHA, 0.5)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = gcnii_layer(hi, h0, w, THETA, ALPHA, 0.5)
    graph.replay()
    first = static.clone()
    graph.replay()
    assert not torch.equal(first != 0, static != 0)
    torch.testing.assert_close(first[first != 0].mean(), static[static != 0].mean(), rtol=0.05, atol=0)
