"""Tests of the CMD op family: ``central_moments``, ``cmd`` and ``cmd_pairwise`` (and their private helper ops).

Oracle: the pure-PyTorch references of ``mmer_ext.ops._reference``, evaluated in float64 on exactly the values the
op saw (inputs are generated in float64, rounded to the dtype under test, and the reference reads them back).
Tolerances are derived from the data instead of fixed per test; see ``forward_tolerance`` and ``grad_tolerance``.
"""

from __future__ import annotations

import warnings
from itertools import combinations

import pytest
import torch

import mmer_ext  # noqa: F401  (loads the compiled library; registers torch.ops.mmer_ext)
from mmer_ext.ops import central_moments, cmd, cmd_pairwise
from mmer_ext.ops._reference import (
    central_moments_ref,
    cmd_ifmmin_style,
    cmd_pairwise_ifmmin_style,
    cmd_pairwise_ref,
    cmd_ref,
)
from op_testing import (  # noqa: E402  (this folder, put on sys.path by pytest)
    ALL_DTYPES,
    acc_eps,
    as_float64_cpu,
    assert_within,
    cuda_only,
    dtype_id,
    ops_registered_from,
    out_eps,
    place,
    subnormal_spacing,
)

# The kernels sum the powers 1..n_moments of x - shift in sweeps of up to 8 (kMaxPowersPerSweep in cmd_cpu.cpp,
# kMaxPowersPerLaunch in cmd_cuda.cu): these all fit one sweep (7 a partial one); test_many_moments_match_reference
# takes 8 (one full sweep), 9 (a full sweep and a partial second), 16 (two full) and 17 (a partial third).
N_MOMENTS = [1, 2, 5, 7]
POWERS_PER_SWEEP = 8
# B covers a single row (all central moments 0), two rows, odd counts that leave partial register tiles and row
# blocks, and 10**5 rows (many row chunks, so the fixed-order combination of partial sums matters). D covers one
# column, a partial 16-wide tile (17) and many full tiles (1024).
SHAPES = [
    (1, 1),
    (1, 17),
    (2, 17),
    (7, 1),
    (7, 17),
    (2, 1024),
    (33, 1024),
    (10**5, 1),
    (10**5, 17),
]  # B = 10**5 with D = 1024: test_large_input_matches_reference, marked slow
LAYOUTS = ["transposed", "col_step", "row_slice", "row_step"]
OPS = ["central_moments", "cmd", "cmd_pairwise"]

ops = torch.ops.mmer_ext


def _shape_id(shape) -> str:
    return f"B{shape[0]}xD{shape[1]}"


# ---- inputs ---------------------------------------------------------------------------------------------------

_SKEW = (0.0, 0.3, -0.2)


def _values(batch: int, features: int, index: int, mean: float, spread: float) -> torch.Tensor:
    # Every input gets its own location, scale and skew, so the moments of two inputs differ clearly: the
    # gradient of ||c_k(x1) - c_k(x2)|| is ill-conditioned when the two moments nearly coincide, and symmetric
    # data would make every odd moment nearly coincide.
    z = torch.randn(batch, features, dtype=torch.float64)
    return mean + 0.25 * index + spread * ((1 + 0.2 * index) * z + _SKEW[index % 3] * (z * z - 1))


def sample_inputs(
    device,
    dtype,
    batch_sizes,
    features: int,
    *,
    mean: float = 0.0,
    layout: str | list[str] = "contiguous",
    requires_grad: bool = False,
) -> list[torch.Tensor]:
    """One [B_i, features] tensor per entry of ``batch_sizes``, each from its own distribution."""
    layouts = [layout] * len(batch_sizes) if isinstance(layout, str) else list(layout)
    # float16 tops out at 65504: with unit spread the 7th moments of skewed data, or a sum of their norms over
    # 1024 features, overflow it. Half the spread scales the k-th moment by 2**-k and changes no relative error.
    spread = 0.5 if dtype == torch.float16 else 1.0
    xs = []
    for i, (b, lay) in enumerate(zip(batch_sizes, layouts)):
        x = place(_values(b, features, i, mean, spread), device, dtype, lay)
        xs.append(x.detach().requires_grad_(requires_grad))  # detach keeps the view's strides
    return xs


def as_ref(xs, requires_grad: bool = False) -> list[torch.Tensor]:
    return [as_float64_cpu(x, requires_grad) for x in xs]


def batch_sizes_for(op: str, B: int) -> list[int]:
    # Unequal batch sizes exercise the per-input 1/B_i of the gradient.
    return {"central_moments": [B], "cmd": [B, B + 3], "cmd_pairwise": [B, B + 3, B + 5]}[op]


# op name -> (ours, reference); both take the inputs the same way.
_IMPLS = {
    "central_moments": (central_moments, central_moments_ref),
    "cmd": (cmd, cmd_ref),
    "cmd_pairwise": (cmd_pairwise, cmd_pairwise_ref),
}


def _call(op: str, fn, xs, n_moments: int):
    if op == "central_moments":
        return fn(xs[0], n_moments)
    if op == "cmd":
        return fn(xs[0], xs[1], n_moments)
    return fn(xs, n_moments)


def run_op(op: str, xs, n_moments: int):
    return _call(op, _IMPLS[op][0], xs, n_moments)


def run_ref(op: str, xs, n_moments: int):
    return _call(op, _IMPLS[op][1], xs, n_moments)


def grad_output_for(op: str, out: torch.Tensor) -> torch.Tensor:
    # A random cotangent: an all-ones one would hide a gradient that mixes up rows of the [K, D] output.
    return torch.randn(out.shape, dtype=torch.float64).to(device=out.device, dtype=out.dtype)


# ---- tolerances -----------------------------------------------------------------------------------------------
# Error model. The kernels accumulate in float32 for float32/float16/bfloat16 inputs and in float64 for float64
# ("acc eps" below), then round the result to the input dtype ("out eps", one ulp of the result, plus the spacing
# of subnormals for tiny results). The k-th central moment is a mean of k-fold products, so its rounding error is
# about k * acc_eps times the magnitude of the terms, mean(|y|^k), y = x - mean; an error d in the centring point
# (the float64 reference computes x - mean with an error of eps * |x|) adds k * d * mean(|y|^(k-1)). The
# constants C_* leave a margin of about 5x over the largest error / tolerance ratio seen on CPU over this file's
# cases (float16/bfloat16 results sit near half their tolerance: the output rounding, at most half an ulp), and
# are far below what a wrong formula, a skipped row or a wrong power would produce (errors of order 1).

C_FWD = 4.0
C_GRAD = 8.0


def moment_scales(x64: torch.Tensor, n_moments: int) -> torch.Tensor:
    """[K, D]: the magnitude of the terms that make up each output row (see the error model above)."""
    mean = x64.mean(0)
    a = (x64 - mean).abs()
    magnitude = x64.abs() + mean.abs()
    rows = [x64.abs().mean(0) + a.mean(0)]
    power = a  # a ** (k - 1)
    for _ in range(2, n_moments + 1):
        rows.append((power * magnitude).mean(0))
        power = power * a
        rows[-1] += power.mean(0)
    return torch.stack(rows)


def _row_weights(n_moments: int) -> torch.Tensor:
    return torch.arange(1, n_moments + 1, dtype=torch.float64).unsqueeze(1)


def forward_tolerance(op: str, refs64, expected: torch.Tensor, n_moments: int, dtype) -> torch.Tensor:
    acc = C_FWD * acc_eps(dtype)
    out = out_eps(dtype) * expected.abs() + subnormal_spacing(dtype)
    if op == "central_moments":
        return acc * _row_weights(n_moments) * moment_scales(refs64[0], n_moments) + out
    # |cmd error| <= sum over rows k of ||error of c_k(x_i) - c_k(x_j)||: bounded by the moment errors of every
    # input (a pair's mean over pairs is no larger than the sum over all inputs).
    per_input = [
        (_row_weights(n_moments) * moment_scales(x, n_moments)).norm(dim=1).sum() for x in refs64
    ]
    return acc * sum(per_input) + out


def _pair_condition(refs64, n_moments: int, dtype) -> float:
    """How much a rounding error in the moments moves the unit vectors (c_k(x_i) - c_k(x_j)) / ||...|| that the
    CMD gradient is made of: the moment error relative to the distance between the two moments."""
    moments = [central_moments_ref(x, n_moments) for x in refs64]
    noise = [_row_weights(n_moments) * moment_scales(x, n_moments) for x in refs64]
    worst = 0.0
    for i, j in combinations(range(len(refs64)), 2):
        dist = (moments[i] - moments[j]).norm(dim=1)
        spread = (noise[i] + noise[j]).norm(dim=1)
        for d, n in zip(dist.tolist(), spread.tolist()):
            if d > 0:
                worst = max(worst, n / d)
    return 1.0 + worst


def grad_tolerance(op: str, refs64, expected_grads, n_moments: int, dtype) -> list[torch.Tensor]:
    gmax = max(float(g.abs().max()) for g in expected_grads)
    rel = C_GRAD * n_moments * acc_eps(dtype)
    if op != "central_moments":
        rel *= _pair_condition(refs64, n_moments, dtype)
    return [rel * gmax + out_eps(dtype) * g.abs() + subnormal_spacing(dtype) for g in expected_grads]


def check_forward(op: str, xs, n_moments: int) -> None:
    dtype = xs[0].dtype
    out = run_op(op, xs, n_moments)
    refs64 = as_ref(xs)
    expected = run_ref(op, refs64, n_moments)
    assert out.dtype == dtype and out.device == xs[0].device
    assert_within(out, expected, forward_tolerance(op, refs64, expected, n_moments, dtype), f"{op} forward")


def check_grads(op: str, xs, n_moments: int) -> None:
    dtype = xs[0].dtype
    out = run_op(op, xs, n_moments)
    cotangent = grad_output_for(op, out)
    grads = torch.autograd.grad(out, xs, cotangent)
    refs64 = as_ref(xs, requires_grad=True)
    expected_out = run_ref(op, refs64, n_moments)
    expected = torch.autograd.grad(expected_out, refs64, cotangent.to("cpu", torch.float64))
    tols = grad_tolerance(op, as_ref(xs), expected, n_moments, dtype)
    for i, (g, e, t) in enumerate(zip(grads, expected, tols)):
        assert g.dtype == dtype and g.shape == xs[i].shape and g.device == xs[i].device
        assert_within(g, e, t, f"{op} grad of input {i}")


# ---- parity with the float64 reference --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n_moments", N_MOMENTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("op", OPS)
def test_forward_matches_reference(op, shape, n_moments, dtype, device):
    B, D = shape
    check_forward(op, sample_inputs(device, dtype, batch_sizes_for(op, B), D), n_moments)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n_moments", N_MOMENTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("op", OPS)
def test_grads_match_reference(op, shape, n_moments, dtype, device):
    B, D = shape
    xs = sample_inputs(device, dtype, batch_sizes_for(op, B), D, requires_grad=True)
    check_grads(op, xs, n_moments)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("op", OPS)
def test_large_input_matches_reference(op, dtype, device):
    # 10**5 x 1024 per input: about a minute per case on 2 cores (the float64 reference and its autograd
    # dominate) and over 10 GB of memory for cmd_pairwise, hence opt-in.
    xs = sample_inputs(device, dtype, batch_sizes_for(op, 10**5), 1024, requires_grad=True)
    check_forward(op, xs, 7)
    check_grads(op, xs, 7)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n_moments", [2, 7])
@pytest.mark.parametrize("shape", [(1, 17), (7, 1), (33, 17), (300, 40)], ids=_shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", OPS)
def test_strided_inputs_match_reference(op, layout, shape, n_moments, dtype, device):
    B, D = shape
    sizes = batch_sizes_for(op, B)
    # Mix layouts within one call: the op must not assume its inputs share strides.
    layouts = [layout] + ["contiguous", "transposed"][: len(sizes) - 1]
    xs = sample_inputs(device, dtype, sizes, D, layout=layouts, requires_grad=True)
    if B > 1 and D > 1:
        assert not xs[0].is_contiguous() or layout == "row_slice"
    check_forward(op, xs, n_moments)
    check_grads(op, xs, n_moments)


@pytest.mark.parametrize(
    "n_moments", [POWERS_PER_SWEEP, POWERS_PER_SWEEP + 1, 2 * POWERS_PER_SWEEP, 2 * POWERS_PER_SWEEP + 1, 10, 13]
)
@pytest.mark.parametrize("op", OPS)
def test_many_moments_match_reference(op, n_moments, device):
    # Sweep boundaries of the powers (see N_MOMENTS), in float64 where the high moments are still well resolved:
    # a second sweep that restarted at the wrong power, or a partial one that summed a full sweep, changes rows > 8.
    xs = sample_inputs(device, torch.float64, batch_sizes_for(op, 70), 19, requires_grad=True)
    check_forward(op, xs, n_moments)
    check_grads(op, xs, n_moments)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_pairwise_stacked_tensor_matches_list(dtype, device):
    # A [M, B, D] tensor is M inputs of equal batch size; it must agree with the same tensors as a list,
    # forward and backward, and its gradient must arrive in the stacked tensor's shape.
    xs = sample_inputs(device, dtype, [12, 12, 12, 12], 9)
    stacked = torch.stack(xs).requires_grad_()
    listed = [x.clone().requires_grad_() for x in xs]
    out_stacked = cmd_pairwise(stacked, 4)
    out_list = cmd_pairwise(listed, 4)
    assert torch.equal(out_stacked, out_list)
    (g_stacked,) = torch.autograd.grad(out_stacked, stacked)
    g_list = torch.autograd.grad(out_list, listed)
    assert g_stacked.shape == stacked.shape
    assert torch.equal(g_stacked, torch.stack(g_list))
    check_forward("cmd_pairwise", list(stacked.detach().unbind(0)), 4)


def test_default_n_moments_is_5(device):
    x1, x2, x3 = sample_inputs(device, torch.float64, [9, 11, 6], 5)
    assert torch.equal(cmd(x1, x2), cmd(x1, x2, 5))
    assert torch.equal(cmd_pairwise([x1, x2, x3]), cmd_pairwise([x1, x2, x3], 5))
    assert not torch.equal(cmd(x1, x2), cmd(x1, x2, 4))


def test_cmd_is_pairwise_of_two(device):
    # cmd_pairwise is documented as the mean of cmd over pairs: with one pair the two must agree.
    x1, x2 = sample_inputs(device, torch.float32, [9, 11], 5)
    torch.testing.assert_close(cmd(x1, x2, 3), cmd_pairwise([x1, x2], 3), rtol=1e-6, atol=0)


def test_meta_tensors_give_shapes():
    # The fake kernels serve meta tensors too (shape propagation without data).
    x1 = torch.empty(7, 5, device="meta")
    x2 = torch.empty(3, 5, device="meta")
    assert central_moments(x1, 4).shape == (4, 5)
    assert cmd(x1, x2, 3).shape == ()
    assert cmd_pairwise([x1, x2, x1], 3).shape == ()
    for dtype in ALL_DTYPES:
        assert cmd(x1.to(dtype), x2.to(dtype)).dtype == dtype


# ---- the IF-MMIN / MISA baseline ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_moments", [1, 2, 5, 7])
def test_cmd_matches_ifmmin_baseline(n_moments, device):
    x1, x2 = sample_inputs(device, torch.float64, [40, 23], 16)
    ours = cmd(x1, x2, n_moments)
    baseline = cmd_ifmmin_style(x1, x2, n_moments)
    torch.testing.assert_close(ours, baseline, rtol=1e-12, atol=0)


@pytest.mark.parametrize("n_moments", [1, 2, 5, 7])
@pytest.mark.parametrize("m", [2, 3, 5])
def test_cmd_pairwise_matches_ifmmin_baseline(m, n_moments, device):
    xs = sample_inputs(device, torch.float64, [20 + 3 * i for i in range(m)], 16)
    ours = cmd_pairwise(xs, n_moments)
    baseline = cmd_pairwise_ifmmin_style(xs, n_moments)
    torch.testing.assert_close(ours, baseline, rtol=1e-12, atol=0)


# ---- opcheck: schemas, fake kernels, autograd registration, AOT dispatch -------------------------------------------


def _opcheck_cases(device):
    def t(b, d=6, requires_grad=False):
        return sample_inputs(device, torch.float32, [b], d, requires_grad=requires_grad)[0]

    cases = []
    for rg in (False, True):
        tag = "grad" if rg else "nograd"
        cases += [
            (f"central_moments-{tag}", ops.central_moments, (t(9, requires_grad=rg), 3)),
            (f"central_moments-K1-{tag}", ops.central_moments, (t(9, requires_grad=rg), 1)),
            (f"cmd-{tag}", ops.cmd, (t(9, requires_grad=rg), t(5, requires_grad=rg), 4)),
            (
                f"cmd_pairwise-{tag}",
                ops.cmd_pairwise,
                ([t(9, requires_grad=rg), t(5, requires_grad=rg), t(7, requires_grad=rg)], 3),
            ),
            (
                f"_cmd_pairwise_forward-{tag}",
                ops._cmd_pairwise_forward,
                ([t(9, requires_grad=rg), t(4, requires_grad=rg)], 5),
            ),
            (f"_central_moments_forward-{tag}", ops._central_moments_forward, (t(9, requires_grad=rg), 4)),
        ]
    x = t(9)
    moments, m_stats = ops._central_moments_forward(x, 3)
    cases.append(
        ("_central_moments_backward", ops._central_moments_backward, (torch.randn_like(moments), x, m_stats))
    )
    xs = [t(9), t(4), t(6)]
    _, stats = ops._cmd_pairwise_forward(xs, 4)
    cases.append(("_cmd_pairwise_backward", ops._cmd_pairwise_backward, (torch.randn((), device=device), xs, stats)))
    return cases


@pytest.mark.parametrize(
    "case",
    [
        "central_moments-nograd",
        "central_moments-K1-nograd",
        "cmd-nograd",
        "cmd_pairwise-nograd",
        "_cmd_pairwise_forward-nograd",
        "_central_moments_forward-nograd",
        "central_moments-grad",
        "central_moments-K1-grad",
        "cmd-grad",
        "cmd_pairwise-grad",
        "_cmd_pairwise_forward-grad",
        "_central_moments_forward-grad",
        "_central_moments_backward",
        "_cmd_pairwise_backward",
    ],
)
def test_opcheck(case, device):
    cases = {name: (op, args) for name, op, args in _opcheck_cases(device)}
    op, args = cases[case]
    torch.library.opcheck(op, args)


def test_opcheck_covers_every_op():
    # A new op of the family must get an opcheck case: compare the ops registered from mmer_ext.ops.cmd (their
    # set_python_module) with the names tested above. Other families check their own ops in their test files.
    tested = {name.split("-")[0] for name, _, _ in _opcheck_cases("cpu")}
    assert ops_registered_from("mmer_ext.ops.cmd") == tested


# ---- gradcheck ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_moments", [1, 2, 3, 5, 7])
def test_gradcheck_central_moments(n_moments):
    for B in (1, 2, 6):
        (x,) = sample_inputs("cpu", torch.float64, [B], 4, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a: central_moments(a, n_moments), (x,))


@pytest.mark.parametrize("n_moments", [1, 2, 3, 5, 7])
def test_gradcheck_cmd(n_moments):
    x1, x2 = sample_inputs("cpu", torch.float64, [6, 4], 3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cmd(a, b, n_moments), (x1, x2))


@pytest.mark.parametrize("n_moments", [1, 2, 3, 5, 7])
def test_gradcheck_cmd_pairwise(n_moments):
    xs = sample_inputs("cpu", torch.float64, [6, 4, 5, 3], 3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *v: cmd_pairwise(list(v), n_moments), tuple(xs))


# Per op: None when the double backward is implemented (then it must match the reference), else the start of the
# refusal it must raise. Both fused ops refuse today; an op that starts supporting it moves to None here, with its
# result checked, rather than passing silently.
_SECOND_ORDER = {
    "central_moments": r"mmer_ext\.central_moments: second derivatives are not implemented",
    "cmd": r"mmer_ext\.cmd: second derivatives are not implemented",
    # cmd and cmd_pairwise share the backward op _cmd_pairwise_backward, whose refusal names "cmd" today.
    "cmd_pairwise": r"mmer_ext\.cmd(_pairwise)?: second derivatives are not implemented",
}


@pytest.mark.parametrize("op", OPS)
def test_double_backward_is_correct_or_refused(op):
    # The ops are documented as differentiable to first order. A second derivative (a gradient penalty) must then
    # either be refused with the documented message or be right; silently returning a wrong one would corrupt
    # training without a trace, and any other error is a bug.
    n_moments = 3
    xs = sample_inputs("cpu", torch.float64, batch_sizes_for(op, 6), 3, requires_grad=True)
    refs = as_ref(xs, requires_grad=True)

    def first_grad(fn, inputs):
        out = _call(op, fn, inputs, n_moments)
        (g,) = torch.autograd.grad(out.square().sum(), inputs[0], create_graph=True)
        return g

    g_ref = first_grad(_IMPLS[op][1], refs)
    (gg_ref,) = torch.autograd.grad(g_ref.square().sum(), refs[0])
    g = first_grad(_IMPLS[op][0], xs)
    torch.testing.assert_close(g.detach(), g_ref.detach(), msg=lambda m: f"{op}: wrong first derivative. {m}")
    refusal = _SECOND_ORDER[op]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if refusal is not None:
            with pytest.raises(RuntimeError, match=refusal):
                torch.autograd.grad(g.square().sum(), xs[0])
            return
        (gg,) = torch.autograd.grad(g.square().sum(), xs[0])
    torch.testing.assert_close(gg, gg_ref, msg=lambda m: f"{op}: silently wrong second derivative. {m}")


# ---- torch.compile --------------------------------------------------------------------------------------------------


def _all_ops(a, b, c, weights):
    return (central_moments(a, 3) * weights).sum() + 2 * cmd(a, b, 4) + 3 * cmd_pairwise([a, b, c], 5)


def _assert_matches_eager(out, grads, xs, weights):
    eager_xs = [x.detach().clone().requires_grad_() for x in xs]
    expected = _all_ops(*eager_xs, weights)
    expected_grads = torch.autograd.grad(expected, eager_xs)
    # The compiled graph calls the same kernels; only the glue (sums, scaling) may be reordered by inductor.
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def _compile_check(compiled, sizes, D):
    xs = sample_inputs("cpu", torch.float32, sizes, D, requires_grad=True)
    weights = torch.randn(3, D)
    out = compiled(*xs, weights)
    _assert_matches_eager(out, torch.autograd.grad(out, xs), xs, weights)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_matches_eager(dynamic):
    compiled = torch.compile(_all_ops, fullgraph=True, dynamic=dynamic)
    _compile_check(compiled, [7, 5, 6], 8)
    _compile_check(compiled, [11, 9, 3], 13)


_SINGLE_OPS = {
    "central_moments": lambda a, b: central_moments(a, 3).sum(),
    "cmd": lambda a, b: cmd(a, b, 3),
    "cmd_pairwise": lambda a, b: cmd_pairwise([a, b, a], 3),
}


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("op", OPS)
def test_compile_dynamic_reuses_graph_for_new_shapes(op):
    # With dynamic=True a new batch size or feature count must not recompile: every shape the op's kernels,
    # checks and fake kernels touch has to stay symbolic. (aot_eager traces exactly what inductor would get, fast.)
    compiled = torch.compile(_SINGLE_OPS[op], fullgraph=True, dynamic=True, backend="aot_eager")
    for sizes, D, recompile_ok in [([7, 5], 8, True), ([11, 9], 13, False)]:
        a, b = sample_inputs("cpu", torch.float32, sizes, D, requires_grad=True)
        with torch._dynamo.config.patch(error_on_recompile=not recompile_ok):
            out = compiled(a, b)
            out.backward()
        torch.testing.assert_close(out, _SINGLE_OPS[op](a, b))


# ---- numerical stability: a large common mean ---------------------------------------------------------------------
# Central moments do not change when every input is shifted by the same constant, and x - 1e4 is exact in float64 for
# x in [5e3, 2e4] (Sterbenz). So the reference on x - SHIFT in float64 is the exact-rounding truth of the values the
# op saw; the reference on x itself would compute x - mean(x) with errors of 1e4 * 2**-53 ~ 1e-12, about what our
# float64 result is being checked for.

LARGE_MEAN_CASES = [
    pytest.param(torch.float32, 1e4, id="float32-mean1e4"),
    pytest.param(torch.float64, 1e4, id="float64-mean1e4"),
    # 16-bit formats hold ~3 significant digits, so their "large mean" is 100 (spacing 0.0625 and 0.5 there).
    pytest.param(torch.float16, 100.0, id="float16-mean100"),
    pytest.param(torch.bfloat16, 100.0, id="bfloat16-mean100"),
]


def _large_mean_inputs(op, dtype, mean, device, requires_grad=False):
    # Input i has mean mean + 1/3 + 0.01 * i (each column centred in float64 before rounding), so the mean term
    # of CMD is the difference of two large, nearly equal numbers. The 1/3 keeps the means off the float grid: a
    # mean of exactly 1e4 would round without error and hide an implementation that centres at a rounded mean.
    spread = 0.5 if dtype == torch.float16 else 1.0
    xs = []
    for i, b in enumerate(batch_sizes_for(op, 257)):
        z = torch.randn(b, 33, dtype=torch.float64)
        z = z - z.mean(0)
        skewed = z * z - (z * z).mean(0)
        values = mean + 1 / 3 + 0.01 * i + spread * ((1 + 0.2 * i) * z + _SKEW[i % 3] * skewed)
        xs.append(values.to(device=device, dtype=dtype).requires_grad_(requires_grad))
    return xs


def _shifted_ref(op, xs, mean, n_moments, requires_grad=False):
    refs = as_ref(xs, requires_grad=requires_grad)
    shifted = [r - mean for r in refs]
    out = run_ref(op, shifted, n_moments)
    if op == "central_moments":
        out = out + torch.tensor([mean] + [0.0] * (n_moments - 1), dtype=torch.float64).unsqueeze(1)
    return refs, shifted, out


@pytest.mark.parametrize("n_moments", [1, 5])
@pytest.mark.parametrize("dtype, mean", LARGE_MEAN_CASES)
@pytest.mark.parametrize("op", OPS)
def test_large_mean_forward(op, dtype, mean, n_moments, device):
    xs = _large_mean_inputs(op, dtype, mean, device)
    out = run_op(op, xs, n_moments)
    _, shifted, truth = _shifted_ref(op, xs, mean, n_moments)
    # Tolerance from the centred data: precision relative to the spread, which is what "keeps full precision"
    # means; the magnitude of the mean only enters through the unavoidable rounding of the output.
    tol = forward_tolerance(op, shifted, truth, n_moments, dtype)
    assert_within(out, truth, tol, f"{op} with mean {mean}")


@pytest.mark.parametrize("n_moments", [1, 5])
@pytest.mark.parametrize("op", ["cmd", "cmd_pairwise"])
def test_large_mean_beats_naive_float32(op, n_moments):
    xs = _large_mean_inputs(op, torch.float32, 1e4, "cpu")
    _, _, truth = _shifted_ref(op, xs, 1e4, n_moments)
    ours = run_op(op, xs, n_moments).double()
    # The IF-MMIN code in float32 computes x - mean(x) with the mean rounded to float32 (spacing ~1e-3 at 1e4),
    # an error that the k-th power multiplies: this is why the kernels centre about the first row.
    naive = (cmd_ifmmin_style(*xs, n_moments) if op == "cmd" else cmd_pairwise_ifmmin_style(xs, n_moments)).double()
    ours_err = float((ours - truth).abs())
    naive_err = float((naive - truth).abs())
    assert float(ours_err / truth) < 1e-6
    assert 10 * ours_err <= naive_err, f"ours off by {ours_err:.3e}, naive float32 by {naive_err:.3e}"


@pytest.mark.parametrize("dtype, mean", LARGE_MEAN_CASES)
@pytest.mark.parametrize("op", OPS)
def test_large_mean_grads(op, dtype, mean, device):
    # The gradient is shift-invariant too, so it is held to the precision of centred data. No allowance for
    # 16-bit rounding of saved outputs here: a backward that centres at a rounded mean is off by the rounding of
    # the mean relative to the spread (1e4 * 2**-24 / 1 in float32), which is the precision the forward avoids.
    n_moments = 5
    xs = _large_mean_inputs(op, dtype, mean, device, requires_grad=True)
    out = run_op(op, xs, n_moments)
    cotangent = grad_output_for(op, out)
    grads = torch.autograd.grad(out, xs, cotangent)
    refs, shifted, truth = _shifted_ref(op, xs, mean, n_moments, requires_grad=True)
    expected = torch.autograd.grad(truth, refs, cotangent.to("cpu", torch.float64))
    gmax = max(float(e.abs().max()) for e in expected)
    cond = 1.0 if op == "central_moments" else _pair_condition([s.detach() for s in shifted], n_moments, dtype)
    rel = C_GRAD * n_moments * acc_eps(dtype) * cond
    for i, (g, e) in enumerate(zip(grads, expected)):
        assert_within(g, e, rel * gmax + out_eps(dtype) * e.abs() + subnormal_spacing(dtype), f"{op} grad of input {i}")


# ---- zero norms: the subgradient --------------------------------------------------------------------------------


def _dyadic(batch, features, device, dtype):
    # Multiples of 1/8 below 4: sums, means over a power-of-two batch and shifts by 2 are exact in every dtype
    # (bfloat16 holds 8 significant bits), so "equal moments" are equal bit for bit in the op and the reference.
    return (torch.randint(-31, 32, (batch, features)).double() / 8).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("same_tensor", [True, False], ids=["same-tensor", "copy"])
def test_cmd_of_identical_inputs_is_zero(same_tensor, dtype, device):
    (x1,) = sample_inputs(device, dtype, [33], 17, requires_grad=True)
    x2 = x1 if same_tensor else x1.detach().clone().requires_grad_()
    out = cmd(x1, x2, 5)
    assert out.item() == 0.0
    for g in torch.autograd.grad(out, [x1] if same_tensor else [x1, x2]):
        assert torch.equal(g, torch.zeros_like(g)), "zero norms must give a zero (sub)gradient, not NaN"


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_cmd_pairwise_of_identical_inputs_is_zero(dtype, device):
    (x,) = sample_inputs(device, dtype, [33], 17)
    listed = [x.detach().clone().requires_grad_() for _ in range(3)]
    stacked = torch.stack([x.detach()] * 4).requires_grad_()
    for xs, inputs in [(listed, listed), (stacked, [stacked])]:
        out = cmd_pairwise(xs, 7)
        assert out.item() == 0.0
        for g in torch.autograd.grad(out, inputs):
            assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("relation", ["shifted", "mirrored"])
def test_partly_equal_moments_follow_reference(relation, dtype, device):
    # shifted: x2 = x1 + 2 has the same central moments and a different mean, so every norm but the first is 0.
    # mirrored: x2 = 2 - x1 has equal even moments and opposite odd ones: zero and nonzero norms alternate.
    # The reference (vector_norm) defines the subgradient of a zero norm as 0; the IF-MMIN code gives NaN here.
    x1 = _dyadic(16, 9, device, dtype)
    x2 = x1 + 2 if relation == "shifted" else 2 - x1
    x3 = x1 - 1  # for the pairwise case: another shifted copy
    for op, xs in [("cmd", [x1, x2]), ("cmd_pairwise", [x1, x2, x3])]:
        xs = [x.detach().requires_grad_() for x in xs]
        out = run_op(op, xs, 6)
        grads = torch.autograd.grad(out, xs)
        refs = as_ref(xs, requires_grad=True)
        expected = run_ref(op, refs, 6)
        expected_grads = torch.autograd.grad(expected, refs)
        assert torch.isfinite(out)
        assert_within(out, expected, 4 * out_eps(dtype) * expected.abs(), f"{op} ({relation})")
        gmax = max(float(e.abs().max()) for e in expected_grads)
        for g, e in zip(grads, expected_grads):
            assert torch.isfinite(g).all()
            assert_within(g, e, 4 * out_eps(dtype) * (gmax + e.abs()), f"{op} grad ({relation})")


# ---- determinism ---------------------------------------------------------------------------------------------------


def _outputs_and_grads(xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    moments = central_moments(xs[0], 7)
    (g_moments,) = torch.autograd.grad(moments, xs[0], torch.ones_like(moments))
    loss_cmd = cmd(xs[0], xs[1], 7)
    g_cmd = torch.autograd.grad(loss_cmd, xs[:2])
    loss_pw = cmd_pairwise(xs, 7)
    g_pw = torch.autograd.grad(loss_pw, xs)
    return [moments, g_moments, loss_cmd, *g_cmd, loss_pw, *g_pw]


def _assert_bitwise_equal(first, second, what):
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"{what}: result {i} differs"


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_repeat_runs_are_bitwise_identical(dtype, device):
    # Sizes with many row chunks and partial tiles, where a parallel reduction could pick a different order.
    xs = sample_inputs(device, dtype, [4099, 3001, 517], 37)
    _assert_bitwise_equal(_outputs_and_grads(xs), _outputs_and_grads(xs), "second run")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_thread_count_does_not_change_bits(dtype):
    xs = sample_inputs("cpu", dtype, [4099, 3001, 517], 37)
    torch.set_num_threads(1)  # the autouse fixture restores the count
    one = _outputs_and_grads(xs)
    torch.set_num_threads(2)
    two = _outputs_and_grads(xs)
    _assert_bitwise_equal(one, two, "1 vs 2 threads")


# ---- argument errors --------------------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, device=device).to(dtype) if dtype.is_floating_point else torch.ones(*shape, dtype=dtype)


def _assert_each_op_names(bad, good, pattern):
    # Every public op must name the offending argument: x, x1 or x2, and the index within xs.
    with pytest.raises(RuntimeError, match=r"central_moments: x " + pattern):
        central_moments(bad, 2)
    with pytest.raises(RuntimeError, match=r"cmd: x1 " + pattern):
        cmd(bad, good)
    with pytest.raises(RuntimeError, match=r"cmd: x2 " + pattern):
        cmd(good, bad)
    with pytest.raises(RuntimeError, match=r"cmd_pairwise: xs\[2\] " + pattern):
        cmd_pairwise([good, good, bad])


@pytest.mark.parametrize("shape", [(5,), (5, 3, 2)], ids=["1d", "3d"])
def test_wrong_rank(shape):
    _assert_each_op_names(_t(*shape), _t(5, 3), r"must be a 2-d tensor \[batch, features\], got shape")


def test_feature_mismatch():
    with pytest.raises(RuntimeError, match=r"x2 has 4 features but x1 has 3; the feature dimension D must agree"):
        cmd(_t(5, 3), _t(5, 4))
    with pytest.raises(RuntimeError, match=r"xs\[2\] has 4 features but xs\[0\] has 3"):
        cmd_pairwise([_t(5, 3), _t(2, 3), _t(5, 4)])


@pytest.mark.parametrize("n_moments", [0, -1])
def test_n_moments_below_one(n_moments):
    x = _t(5, 3)
    pattern = rf"n_moments must be >= 1 \(1 compares means only\), got {n_moments}"
    with pytest.raises(RuntimeError, match=r"central_moments: " + pattern):
        central_moments(x, n_moments)
    with pytest.raises(RuntimeError, match=r"cmd: " + pattern):
        cmd(x, x, n_moments)
    with pytest.raises(RuntimeError, match=r"cmd_pairwise: " + pattern):
        cmd_pairwise([x, x], n_moments)


@pytest.mark.parametrize("n_moments", [257, 2**62, 2**63 - 1])
def test_n_moments_above_the_bound(n_moments):
    # 2^62 moments of zero-width features failed in the allocator, or looped over the moments for ever.
    for x in (_t(5, 3), _t(5, 0)):
        pattern = rf"n_moments must be <= 256 \(higher moments overflow float32\), got {n_moments}"
        with pytest.raises(RuntimeError, match=r"central_moments: " + pattern):
            central_moments(x, n_moments)
        with pytest.raises(RuntimeError, match=r"cmd: " + pattern):
            cmd(x, x, n_moments)
        with pytest.raises(RuntimeError, match=r"cmd_pairwise: " + pattern):
            cmd_pairwise([x, x], n_moments)


@pytest.mark.parametrize("n_moments", [2**63, 2**70])
def test_n_moments_beyond_int64_is_named(n_moments):
    # The schema's own message ("expected int, found int") names no argument; the wrappers replace it.
    x = _t(5, 3)
    pattern = rf"n_moments must fit in int64, got {n_moments}"
    with pytest.raises(ValueError, match=r"central_moments: " + pattern):
        central_moments(x, n_moments)
    with pytest.raises(ValueError, match=r"cmd: " + pattern):
        cmd(x, x, n_moments)
    for xs in ([x, x], (x, x), torch.stack([x, x])):
        with pytest.raises(ValueError, match=r"cmd_pairwise: " + pattern):
            cmd_pairwise(xs, n_moments)


def test_sparse_input_is_named():
    dense, sparse = _t(5, 3), _t(5, 3).to_sparse()
    with pytest.raises(ValueError, match=r"central_moments: x must be a dense \(strided\) tensor, got a sparse_coo"):
        central_moments(sparse, 3)
    with pytest.raises(ValueError, match=r"cmd: x2 must be a dense \(strided\) tensor, got a sparse_coo tensor"):
        cmd(dense, sparse)
    with pytest.raises(ValueError, match=r"cmd_pairwise: xs\[1\] must be a dense \(strided\) tensor"):
        cmd_pairwise([dense, sparse])


def test_empty_batch():
    _assert_each_op_names(_t(0, 3), _t(5, 3), r"has an empty batch \(shape \[0, 3\]\); moments need at least one row")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=dtype_id)
def test_unsupported_dtype(dtype):
    _assert_each_op_names(
        torch.ones(5, 3, dtype=dtype), _t(5, 3), r"must be float32, float64, float16 or bfloat16, got"
    )


def test_mixed_dtypes():
    with pytest.raises(RuntimeError, match=r"x2 has dtype Double but x1 has Float; cast them to one dtype"):
        cmd(_t(5, 3), _t(5, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"xs\[2\] has dtype Half but xs\[0\] has Float"):
        cmd_pairwise([_t(5, 3), _t(5, 3), _t(5, 3, dtype=torch.float16)])


@pytest.mark.parametrize("case", ["empty-list", "one-list", "one-stacked"])
def test_pairwise_needs_two_inputs(case):
    xs = {"empty-list": [], "one-list": [_t(5, 3)], "one-stacked": _t(1, 5, 3)}[case]
    with pytest.raises(RuntimeError, match=r"xs must hold at least 2 tensors to form a pair, got [01]"):
        cmd_pairwise(xs)


def test_pairwise_rejects_2d_tensor():
    with pytest.raises(ValueError, match=r"xs as one tensor must be \[M, B, D\], got shape \(5, 3\)"):
        cmd_pairwise(_t(5, 3))


@pytest.mark.parametrize(
    "xs", [3, None, iter([torch.zeros(2, 2)] * 2), {"a": torch.zeros(2, 2)}], ids=["int", "None", "iterator", "dict"]
)
def test_pairwise_rejects_non_sequence(xs):
    with pytest.raises(TypeError, match=r"xs must be a tensor or a sequence of tensors, got"):
        cmd_pairwise(xs)


def test_pairwise_rejects_non_tensor_elements():
    with pytest.raises(RuntimeError, match=r"argument 'xs'"):
        cmd_pairwise([_t(5, 3), 3])


def test_meta_and_cpu_inputs_are_rejected():
    cpu, meta = _t(5, 3), torch.empty(5, 3, device="meta")
    with pytest.raises(RuntimeError, match=r"cmd: x2 is on meta but x1 is on cpu; move them to one device"):
        cmd(cpu, meta)
    with pytest.raises(RuntimeError, match=r"cmd_pairwise: xs\[1\] is on cpu but xs\[0\] is on meta"):
        cmd_pairwise([meta, cpu])


def test_backward_ops_check_their_arguments():
    x = _t(5, 3)
    _, m_stats = ops._central_moments_forward(x, 3)
    # Only the message prefixes are pinned: the layout of the private stats tensor is free to change.
    with pytest.raises(RuntimeError, match=r"_central_moments_backward: grad \[2, 3\] must be \[n_moments, 3\]"):
        ops._central_moments_backward(torch.zeros(2, 3), x, m_stats)
    _, stats = ops._cmd_pairwise_forward([x, x], 3)
    with pytest.raises(RuntimeError, match=r"_cmd_pairwise_backward: stats must be \[3, "):
        ops._cmd_pairwise_backward(torch.ones(()), [x, x, x], stats)
    # Statistics of inputs with another feature dimension would make the kernels read past their rows.
    with pytest.raises(RuntimeError, match=r"_cmd_pairwise_backward: stats must be \[2, "):
        ops._cmd_pairwise_backward(torch.ones(()), [_t(5, 4), _t(5, 4)], stats)


@cuda_only
def test_inputs_on_different_devices_are_rejected():
    cpu, gpu = _t(5, 3), _t(5, 3, device="cuda")
    with pytest.raises(RuntimeError, match=r"cmd: x2 is on cpu but x1 is on cuda(:0)?; move them to one device"):
        cmd(gpu, cpu)
    with pytest.raises(RuntimeError, match=r"cmd_pairwise: xs\[1\] is on cuda(:0)? but xs\[0\] is on cpu"):
        cmd_pairwise([cpu, gpu])


# ---- CUDA only ------------------------------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(1, 17), (33, 1024), (10**5, 17)], ids=_shape_id)
@pytest.mark.parametrize("op", OPS)
def test_cuda_matches_cpu(op, shape, dtype):
    # Both devices approximate the same float64 truth within the tolerance, so they agree within twice that.
    B, D = shape
    xs_cpu = sample_inputs("cpu", dtype, batch_sizes_for(op, B), D, requires_grad=True)
    xs_gpu = [x.detach().cuda().requires_grad_() for x in xs_cpu]
    out_cpu, out_gpu = run_op(op, xs_cpu, 7), run_op(op, xs_gpu, 7)
    refs64 = as_ref(xs_cpu)
    expected = run_ref(op, refs64, 7)
    tol = 2 * forward_tolerance(op, refs64, expected, 7, dtype)
    assert_within(out_gpu, out_cpu.double(), tol, f"{op} forward, CUDA vs CPU")
    cotangent = grad_output_for(op, out_cpu)
    g_cpu = torch.autograd.grad(out_cpu, xs_cpu, cotangent)
    g_gpu = torch.autograd.grad(out_gpu, xs_gpu, cotangent.cuda())
    refs = as_ref(xs_cpu, requires_grad=True)
    expected_grads = torch.autograd.grad(run_ref(op, refs, 7), refs, cotangent.double())
    tols = grad_tolerance(op, refs64, expected_grads, 7, dtype)
    for a, b, t in zip(g_gpu, g_cpu, tols):
        assert_within(a, b.double(), 2 * t, f"{op} grad, CUDA vs CPU")


@cuda_only
def test_cuda_graph_capture_of_pairwise_forward_and_backward():
    static = sample_inputs("cuda", torch.float32, [64, 40, 51], 33, requires_grad=True)

    def step(xs):
        loss = cmd_pairwise(xs, 5)
        return loss, torch.autograd.grad(loss, xs)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up allocators and library handles outside the capture
            step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_grads = step(static)

    for trial in range(3):
        fresh = sample_inputs("cuda", torch.float32, [64, 40, 51], 33, mean=float(trial))
        with torch.no_grad():
            for s, f in zip(static, fresh):
                s.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        eager_xs = [f.clone().requires_grad_() for f in fresh]
        loss, grads = step(eager_xs)
        torch.testing.assert_close(static_loss, loss, rtol=1e-6, atol=0)
        for a, b in zip(static_grads, grads):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@cuda_only
@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_reduce_overhead_cuda():
    compiled = torch.compile(_all_ops, mode="reduce-overhead", fullgraph=True)
    for trial in range(3):
        torch.compiler.cudagraph_mark_step_begin()
        xs = sample_inputs("cuda", torch.float32, [17, 9, 12], 24, mean=float(trial), requires_grad=True)
        weights = torch.randn(3, 24, device="cuda")
        out = compiled(*xs, weights)
        grads = [g.clone() for g in torch.autograd.grad(out, xs)]
        out = out.detach().clone()  # cudagraph outputs are overwritten by the next replay
        _assert_matches_eager(out, grads, xs, weights)
