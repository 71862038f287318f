"""Property-based fuzz suite of every public op of :mod:`mmer_ext.ops` (hypothesis).

Every drawn call must either match the op's ``*_ref`` of :mod:`mmer_ext.ops._reference` (tolerances per dtype,
forward and, for float64, backward) or raise a clean error: a ValueError, RuntimeError or TypeError whose first line
names one of the op's arguments. Never a crash, never NaN or Inf where the reference is finite, never uninitialised
memory (the meta-mixed-with-CPU calls that used to return ``x.new_empty(...)``).

Three kinds of calls, per op:

* valid calls: random shapes (empty ones included), dtypes, strides (transposed, every other element with NaN in
  between, stride-0 expanded rows) and parameter forms; must succeed and match the reference;
* device mixes: all tensors on meta (shapes must match a CPU call) or one argument on meta among CPU ones (must raise,
  naming it);
* risky calls: one argument replaced by something wrong or extreme (a bad shape or dtype, negative / NaN / Inf /
  huge scalars, lengths whose sum wraps int64, windows beyond int64, ...). A missing check there could crash the
  process, so they run in a child process (this file run as a script): a crash fails
  ``test_risky_calls_in_a_subprocess`` and the child's last ``case:`` line names the call.

Reproducible and bounded for CI: ``derandomize=True`` (examples depend only on the test), no example database,
``deadline=None``, a fixed number of examples per op.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmer_ext  # noqa: F401  (loads the compiled library)
from mmer_ext import ops as O
from mmer_ext.ops import _reference as R
from op_testing import dtype_id, next_cpu_key  # noqa: E402  (this folder, put on sys.path by pytest)

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
ALL_FLOATS = [F32, F64, F16, BF16]
CPU_STEP_FLOATS = [F32, F64]  # the step ops take float16 / bfloat16 on CUDA only

VALID_EXAMPLES = 50
DEVICE_EXAMPLES = 15
RISKY_EXAMPLES = 150

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# The functional ops; their nn.Module forms (CMDLoss, ...) only call them and are checked against them in
# test_modules.py.
OPS = sorted(name for name in O.__all__ if not isinstance(getattr(O, name), type))
# Arguments read on the host, which may stay on the CPU whatever the device of the others.
HOST_OK = {"lengths"}
HOST_SCALAR_OK = {"t", "alpha_bar_t", "alpha_bar_prev"}


def _arg_names(op: str) -> tuple[str, ...]:
    return tuple(inspect.signature(getattr(O, op)).parameters)


# ---- the calls ----------------------------------------------------------------------------------------------------


@dataclass
class Case:
    op: str
    args: dict[str, Any]  # keyword arguments of the public wrapper
    ref: Callable[[dict[str, Any]], Any] | None  # the reference on these arguments; None: no numeric check
    dtype: torch.dtype  # of the outputs
    expect: str = "ok"  # "ok": must succeed; "error": must raise; "either"
    grad_args: tuple[str, ...] = ()  # differentiable tensor arguments (backward checked in float64)
    tol: dict = field(default_factory=dict)  # per-dtype tolerance overrides
    magnitude: Callable[[dict[str, Any]], float] | None = None  # scale of the rounding errors, if not max |ref|
    label: str = "valid"

    def call(self, args: dict[str, Any] | None = None):
        return getattr(O, self.op)(**(self.args if args is None else args))

    def describe(self) -> str:
        def show(v):
            if isinstance(v, torch.Tensor):
                return f"Tensor{tuple(v.shape)}:{dtype_id(v.dtype)}@{v.device}/{v.stride()}"
            if isinstance(v, (list, tuple)):
                return "[" + ", ".join(show(e) for e in v) + "]"
            if isinstance(v, torch.Generator):
                return "Generator"
            return repr(v)

        return f"{self.op}[{self.label}](" + ", ".join(f"{k}={show(v)}" for k, v in self.args.items()) + ")"


# Tolerance on max |op - ref| relative to max(1, max |ref|), per output dtype.
TOL = {F64: 1e-9, F32: 1e-4, F16: 5e-3, BF16: 4e-2}


def _draw_seed(draw) -> torch.Generator:
    return torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))


def _layout(draw, t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a random memory layout (the ops take any strides)."""
    kind = draw(st.sampled_from(["contiguous", "transposed", "every-other", "expanded"]))
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if kind == "every-other" and t.dim() >= 1:
        # A view of every other element of a wider buffer whose other elements are NaN: reading past the view shows.
        wide = torch.full((*t.shape[:-1], 2 * t.shape[-1] + 1), float("nan"), dtype=t.dtype)
        wide[..., 1::2] = t
        return wide[..., 1::2]
    if kind == "expanded" and t.dim() >= 1 and t.shape[0] > 1:
        return t[:1].expand(t.shape)  # stride 0: every row the same memory
    return t


def _tensor(draw, shape, dtype, *, scale=None, layout=True) -> torch.Tensor:
    gen = _draw_seed(draw)
    if scale is None:
        scale = draw(st.sampled_from([1.0, 0.1, 10.0]))
    v = (torch.randn(shape, generator=gen, dtype=F64) * scale).to(dtype)
    return _layout(draw, v) if layout else v


def _as64(v):
    """Arguments for a float64 reference: tensors upcast (lists too), everything else unchanged."""
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.double()
    if isinstance(v, list):
        return [_as64(e) for e in v]
    return v


# ---- builders of valid calls, one per op ----------------------------------------------------------------------------


def _moment_magnitude(xs, K: int) -> float:
    """The size of the terms that CMD sums and subtracts: rounding errors scale with these, not with the result
    (two batches from one distribution have nearly equal moments, so their CMD is small)."""
    xs = [xs] if isinstance(xs, torch.Tensor) and xs.dim() == 2 else list(xs)
    total = 0.0
    for x in xs:
        x64 = x.double()
        if x64.numel() == 0:
            continue
        centred = (x64 - x64.mean(0)).abs()
        total += x64.mean(0).abs().max().item() + sum(centred.pow(k).mean(0).max().item() for k in range(2, K + 1))
    return total


@st.composite
def central_moments_case(draw):
    dtype = draw(st.sampled_from(ALL_FLOATS))
    B, D = draw(st.integers(1, 6)), draw(st.integers(0, 7))
    x = _tensor(draw, (B, D), dtype, scale=draw(st.sampled_from([1.0, 0.3, 2.0])))
    K = draw(st.integers(1, 5))
    return Case("central_moments", {"x": x, "n_moments": K},
                lambda a: R.central_moments_ref(_as64(a["x"]), a["n_moments"]), dtype, grad_args=("x",),
                magnitude=lambda a: _moment_magnitude(a["x"], a["n_moments"]))


@st.composite
def cmd_case(draw):
    dtype = draw(st.sampled_from(ALL_FLOATS))
    D = draw(st.integers(0, 6))
    scale = draw(st.sampled_from([1.0, 0.3, 2.0]))
    x1 = _tensor(draw, (draw(st.integers(1, 6)), D), dtype, scale=scale)
    x2 = _tensor(draw, (draw(st.integers(1, 6)), D), dtype, scale=scale) + 0.5
    K = draw(st.integers(1, 5))
    return Case("cmd", {"x1": x1, "x2": x2, "n_moments": K},
                lambda a: R.cmd_ref(_as64(a["x1"]), _as64(a["x2"]), a["n_moments"]), dtype,
                magnitude=lambda a: _moment_magnitude([a["x1"], a["x2"]], a["n_moments"]))


@st.composite
def cmd_pairwise_case(draw):
    dtype = draw(st.sampled_from(ALL_FLOATS))
    M, D = draw(st.integers(2, 4)), draw(st.integers(0, 5))
    scale = draw(st.sampled_from([1.0, 0.3, 2.0]))
    if draw(st.booleans()):
        xs = _tensor(draw, (M, draw(st.integers(1, 5)), D), dtype, scale=scale)
    else:
        xs = [_tensor(draw, (draw(st.integers(1, 5)), D), dtype, scale=scale) + i for i in range(M)]
    K = draw(st.integers(1, 5))
    return Case("cmd_pairwise", {"xs": xs, "n_moments": K},
                lambda a: R.cmd_pairwise_ref(_as64(a["xs"]), a["n_moments"]), dtype,
                magnitude=lambda a: _moment_magnitude(a["xs"], a["n_moments"]))


def _lengths(draw, max_dialogues=3, max_length=4) -> list[int]:
    return draw(st.lists(st.integers(1, max_length), min_size=0, max_size=max_dialogues))


@st.composite
def angular_adjacency_case(draw):
    dtype = draw(st.sampled_from(ALL_FLOATS))
    M, D = draw(st.integers(1, 3)), draw(st.integers(0, 6))
    lengths = _lengths(draw)
    N = sum(lengths)
    # Feature scales far from 1 too: the result must not depend on them (float16 / bfloat16 hold less range).
    exps = [-30, -20, 0, 19, 30] if dtype in (F32, F64) else [-3, 0, 3]
    scale = 10.0 ** draw(st.sampled_from(exps))
    values = torch.randn(M, N, D, generator=_draw_seed(draw), dtype=F64)
    if N and draw(st.booleans()):
        values[draw(st.integers(0, M - 1)), draw(st.integers(0, N - 1))] = 0.0  # a zero vector
    features = _layout(draw, (values * scale).to(dtype))
    kwargs = {
        "scale": draw(st.sampled_from([0.99999, 1.0, 0.5])),
        "normalize": draw(st.booleans()),
        "window": draw(st.sampled_from([None, 0, 1, 2, 2**63 - 1])),
        "layout": draw(st.sampled_from(["dense", "blocks"])),
    }
    args = {"features": features, "lengths": torch.tensor(lengths, dtype=torch.int64), **kwargs}

    def ref(a):
        return R.angular_adjacency_ref(_as64(a["features"]), a["lengths"], scale=a["scale"],
                                       normalize=a["normalize"], window=a["window"], layout=a["layout"])

    # The arccos slope at |scale * cos| -> 1 is steep: near-parallel rows carry the input's rounding into the weight.
    tol = {F32: 5e-4 if kwargs["scale"] == 1.0 else 2e-4, F64: 1e-7}
    grad_args = ("features",) if kwargs["scale"] < 1.0 else ()
    return Case("angular_adjacency", args, ref, dtype, grad_args=grad_args, tol=tol)


def _generator_and_key(draw) -> tuple[torch.Generator, int]:
    """A drawn generator and the key an in-kernel dropout will take from it on the CPU, read before the call (the
    ops' masks are then the reference Philox stream under that key)."""
    generator = _draw_seed(draw)
    return generator, next_cpu_key(generator)


@st.composite
def gcnii_layer_case(draw):
    dtype = draw(st.sampled_from(ALL_FLOATS))
    N, F = draw(st.integers(0, 6)), draw(st.integers(1, 5))
    hi, h0 = _tensor(draw, (N, F), dtype), _tensor(draw, (N, F), dtype)
    weight = _tensor(draw, (2 * F, F), dtype, scale=0.5)
    theta, alpha = draw(st.floats(0.0, 1.0)), draw(st.floats(0.0, 1.0))
    dropout = draw(st.sampled_from([0.0, 0.0, 0.3]))
    args = {"hi": hi, "h0": h0, "weight": weight, "theta": theta, "alpha": alpha, "dropout": dropout}
    if dropout == 0.0:
        return Case("gcnii_layer", args,
                    lambda a: R.gcnii_layer_ref(_as64(a["hi"]), _as64(a["h0"]), _as64(a["weight"]), a["theta"],
                                                a["alpha"]),
                    dtype, grad_args=("hi", "h0", "weight"), tol={F16: 1e-2})
    args["generator"], key = _generator_and_key(draw)

    def ref(a):
        keep = R.gcnii_dropout_keep_ref(key, (N, F), a["dropout"])
        return R.gcnii_layer_ref(_as64(a["hi"]), _as64(a["h0"]), _as64(a["weight"]), a["theta"], a["alpha"],
                                 a["dropout"], keep=keep)

    return Case("gcnii_layer", args, ref, dtype, tol={F16: 1e-2}, label="dropout")


@st.composite
def attention_case(draw):
    dtype = draw(st.sampled_from(ALL_FLOATS))
    B, H, Lq, Lk, D = (draw(st.integers(0, 2)), draw(st.integers(1, 3)), draw(st.integers(0, 6)),
                       draw(st.integers(0, 6)), draw(st.integers(0, 5)))
    q, k, v = (_tensor(draw, shape, dtype) for shape in ((B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D)))
    mask = (torch.rand(Lq, Lk, generator=_draw_seed(draw)) < 0.4) if draw(st.booleans()) else None
    scale = draw(st.sampled_from([None, None, 0.3, 1.0]))
    dropout = draw(st.sampled_from([0.0, 0.0, 0.3]))
    args = {"query": q, "key": k, "value": v, "mask": mask, "dropout": dropout, "scale": scale}
    if dropout == 0.0:
        return Case("attention", args,
                    lambda a: R.attention_ref(_as64(a["query"]), _as64(a["key"]), _as64(a["value"]), a["mask"],
                                              scale=a["scale"]),
                    dtype, grad_args=("query", "key", "value"), tol={F16: 1e-2})
    args["generator"], key = _generator_and_key(draw)

    def ref(a):
        keep = R.gcnii_dropout_keep_ref(key, (B, H, Lq, Lk), a["dropout"])
        return R.attention_ref(_as64(a["query"]), _as64(a["key"]), _as64(a["value"]), a["mask"], a["dropout"],
                               scale=a["scale"], keep=keep)

    return Case("attention", args, ref, dtype, tol={F16: 1e-2}, label="dropout")


@st.composite
def block_graph_propagate_case(draw):
    dtype = draw(st.sampled_from(ALL_FLOATS))
    M, F = draw(st.integers(1, 3)), draw(st.integers(0, 4))
    lengths = _lengths(draw)
    N, G = sum(lengths), len(lengths)
    S = M * (max(lengths) if lengths else 0)
    blocks = _tensor(draw, (G, S, S), dtype, scale=0.5)
    x = _tensor(draw, (M * N, F), dtype)
    args = {"blocks": blocks, "x": x, "lengths": torch.tensor(lengths, dtype=torch.int64), "num_modalities": M}
    return Case("block_graph_propagate", args,
                lambda a: R.block_graph_propagate_ref(_as64(a["blocks"]), _as64(a["x"]), a["lengths"],
                                                      a["num_modalities"]),
                dtype, grad_args=("blocks", "x"), tol={F16: 1e-2})


def _time(draw, B: int, low=0.0, high=1.5):
    """A time (or alpha_bar) as a float, a 0-d CPU tensor or a [B] tensor."""
    form = draw(st.sampled_from(["float", "0d", "batch"]))
    value = st.floats(low, high, allow_nan=False, allow_infinity=False)
    if form == "float":
        return draw(value)
    dtype = draw(st.sampled_from([F32, F64]))
    if form == "0d":
        return torch.tensor(draw(value), dtype=dtype)
    return torch.tensor(draw(st.lists(value, min_size=B, max_size=B)), dtype=dtype)


def _coefficient_case(op, ref):
    @st.composite
    def build(draw):
        dtype = draw(st.sampled_from(ALL_FLOATS))
        # t > 0: d std/dt is infinite at t = 0.
        if draw(st.booleans()):
            t = draw(st.floats(0.01, 1.5))
            out_dtype = torch.get_default_dtype()
        else:
            shape = draw(st.sampled_from([(), (0,), (3,), (2, 3)]))
            t = _layout(draw, (torch.rand(shape, generator=_draw_seed(draw), dtype=F64) * 1.5 + 0.01).to(dtype))
            out_dtype = dtype
        sigma = draw(st.sampled_from([25.0, 2.0, 0.5, 100.0]))
        grad = ("t",) if isinstance(t, torch.Tensor) else ()
        return Case(op, {"t": t, "sigma": sigma}, lambda a: ref(_as64(a["t"]), a["sigma"]), out_dtype,
                    grad_args=grad)

    return build


def _state(draw, dtype):
    shape = draw(st.sampled_from([(0, 3), (1, 1), (3, 4), (2, 3, 5), (4, 2, 1, 3)]))
    return _tensor(draw, shape, dtype)


@st.composite
def ve_perturb_case(draw):
    dtype = draw(st.sampled_from(CPU_STEP_FLOATS))
    x = _state(draw, dtype)
    t = _time(draw, x.shape[0])
    sigma = draw(st.sampled_from([25.0, 2.0, 0.5]))
    if draw(st.booleans()):
        args = {"x": x, "t": t, "sigma": sigma, "noise": _tensor(draw, x.shape, dtype)}
        return Case("ve_perturb", args, lambda a: R.ve_perturb_ref(a["x"], a["t"], a["sigma"], noise=a["noise"]),
                    dtype, grad_args=("x", "noise"))
    args = {"x": x, "t": t, "sigma": sigma, "generator": _draw_seed(draw)}
    return Case("ve_perturb", args, None, dtype)


@st.composite
def ve_sde_em_step_case(draw):
    dtype = draw(st.sampled_from(CPU_STEP_FLOATS))
    x = _state(draw, dtype)
    args = {"x": x, "score": _tensor(draw, x.shape, dtype), "t": _time(draw, x.shape[0]),
            "dt": draw(st.floats(0.0, 0.1)), "sigma": draw(st.sampled_from([25.0, 2.0]))}
    if draw(st.booleans()):
        args["noise"] = _tensor(draw, x.shape, dtype)
        return Case("ve_sde_em_step", args,
                    lambda a: R.ve_sde_em_step_ref(a["x"], a["score"], a["t"], a["dt"], a["sigma"], noise=a["noise"]),
                    dtype, grad_args=("x", "score", "noise"))
    args["generator"] = _draw_seed(draw)
    return Case("ve_sde_em_step", args, None, dtype)


@st.composite
def ve_ode_step_case(draw):
    dtype = draw(st.sampled_from(CPU_STEP_FLOATS))
    x = _state(draw, dtype)
    args = {"x": x, "score": _tensor(draw, x.shape, dtype), "t": _time(draw, x.shape[0]),
            "dt": draw(st.floats(0.0, 0.1)), "sigma": draw(st.sampled_from([25.0, 2.0]))}
    return Case("ve_ode_step", args,
                lambda a: R.ve_ode_step_ref(a["x"], a["score"], a["t"], a["dt"], a["sigma"]), dtype,
                grad_args=("x", "score"))


@st.composite
def langevin_corrector_step_case(draw):
    dtype = draw(st.sampled_from(CPU_STEP_FLOATS))
    x = _state(draw, dtype)
    score = _tensor(draw, x.shape, dtype)
    if x.shape[0] and draw(st.booleans()):
        score = score.clone()
        score[0] = 0  # a zero score: step size 0 for that sample
    args = {"x": x, "score": score, "snr": draw(st.floats(0.0, 0.5))}
    if draw(st.booleans()):
        args["noise"] = _tensor(draw, x.shape, dtype)
        return Case("langevin_corrector_step", args,
                    lambda a: R.langevin_corrector_step_ref(a["x"], a["score"], a["snr"], noise=a["noise"]), dtype,
                    grad_args=("x", "score", "noise"))
    args["generator"] = _draw_seed(draw)
    return Case("langevin_corrector_step", args, None, dtype)


@st.composite
def ddim_step_case(draw):
    dtype = draw(st.sampled_from(CPU_STEP_FLOATS))
    x = _state(draw, dtype)
    B = x.shape[0]
    args = {"x_t": x, "eps": _tensor(draw, x.shape, dtype), "alpha_bar_t": _time(draw, B, 0.01, 1.0),
            "alpha_bar_prev": _time(draw, B, 0.01, 1.0), "eta": draw(st.sampled_from([0.0, 0.5, 1.0]))}
    if args["eta"] == 0.0 or draw(st.booleans()):
        if args["eta"] != 0.0:
            args["noise"] = _tensor(draw, x.shape, dtype)

        def ref(a):
            return R.ddim_step_ref(a["x_t"], a["eps"], a["alpha_bar_t"], a["alpha_bar_prev"], a["eta"],
                                   noise=a.get("noise"))

        grads = ("x_t", "eps", "noise") if "noise" in args else ("x_t", "eps")
        return Case("ddim_step", args, ref, dtype, grad_args=grads)
    args["generator"] = _draw_seed(draw)
    return Case("ddim_step", args, None, dtype)


BUILDERS: dict[str, Callable] = {
    "central_moments": central_moments_case,
    "cmd": cmd_case,
    "cmd_pairwise": cmd_pairwise_case,
    "angular_adjacency": angular_adjacency_case,
    "block_graph_propagate": block_graph_propagate_case,
    "gcnii_layer": gcnii_layer_case,
    "attention": attention_case,
    "ve_marginal_std": _coefficient_case("ve_marginal_std", R.ve_marginal_std_ref),
    "ve_diffusion_coeff": _coefficient_case("ve_diffusion_coeff", R.ve_diffusion_coeff_ref),
    "ve_perturb": ve_perturb_case,
    "ve_sde_em_step": ve_sde_em_step_case,
    "ve_ode_step": ve_ode_step_case,
    "langevin_corrector_step": langevin_corrector_step_case,
    "ddim_step": ddim_step_case,
}


# ---- checking one call ----------------------------------------------------------------------------------------------


def _names_an_argument(message: str, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message) for n in names)


def _outputs(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _finite_inputs(args: dict[str, Any]) -> bool:
    for v in args.values():
        for t in v if isinstance(v, list) else [v]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
                if not torch.isfinite(t).all():
                    return False
            elif isinstance(t, float) and not math.isfinite(t):
                return False
    return True


def _compare(case: Case, got: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> None:
    assert len(got) == len(expected), f"{case.describe()}: {len(got)} outputs, reference {len(expected)}"
    for i, (o, e) in enumerate(zip(got, expected)):
        tol = {**TOL, **case.tol}[o.dtype if o.dtype in TOL else case.dtype]
        where = f"{case.describe()} output {i}"
        assert o.device.type == "cpu", where
        assert tuple(o.shape) == tuple(e.shape), f"{where}: shape {tuple(o.shape)}, reference {tuple(e.shape)}"
        if case.expect == "ok":  # a risky call may change the dtype (a float64 argument among float32 ones)
            assert o.dtype == case.dtype, f"{where}: dtype {o.dtype}, expected {case.dtype}"
        o64, e64 = o.double(), e.detach().double()
        # Where the reference is finite the op must be too (no NaN from valid input). Where the reference overflows,
        # or is so large that its square does (norms square their entries, as ||x|| does in float64 beyond 1e154),
        # the op may overflow as well.
        limit = torch.finfo(o.dtype).max ** 0.5 if o.is_floating_point() else math.inf
        must_be_finite = torch.isfinite(e64) & (e64.abs() < limit)
        assert torch.isfinite(o64[must_be_finite]).all(), f"{where}: non-finite values where the reference is finite"
        finite = torch.isfinite(e64) & torch.isfinite(o64)
        if finite.any():
            err = (o64[finite] - e64[finite]).abs().max().item()
            size = max(1.0, e64[finite].abs().max().item())
            if case.magnitude is not None:
                try:
                    size = max(size, case.magnitude(case.args))
                except Exception:  # noqa: BLE001 - arguments the magnitude cannot read (a risky call's)
                    pass
            bound = tol * size
            assert err <= bound, f"{where}: max |op - ref| = {err:.3g} > {bound:.3g}"


def _check_backward(case: Case) -> None:
    """float64: the gradient of <op(args), cot> matches the reference's."""
    names = [n for n in case.grad_args if isinstance(case.args.get(n), torch.Tensor) and case.args[n].numel() > 0]
    if case.dtype != F64 or case.ref is None or not names:
        return
    args = dict(case.args)
    ref_args = dict(case.args)
    for n in names:
        args[n] = case.args[n].detach().clone().requires_grad_()
        ref_args[n] = case.args[n].detach().clone().double().requires_grad_()
    outs = _outputs(case.call(args))
    refs = _outputs(case.ref(ref_args))
    gen = torch.Generator().manual_seed(0)
    cots = [torch.randn(o.shape, generator=gen, dtype=F64) for o in outs]
    # A coefficient's derivative is unbounded at t -> 0 and reaches 1e3 within the drawn range: relative tolerance.
    got = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cots)), [args[n] for n in names],
                              allow_unused=True)
    want = torch.autograd.grad(sum((r * c).sum() for r, c in zip(refs, cots)), [ref_args[n] for n in names],
                               allow_unused=True)
    for n, g, w in zip(names, got, want):
        g = torch.zeros_like(args[n]) if g is None else g
        w = torch.zeros_like(ref_args[n]) if w is None else w
        assert torch.isfinite(g).all(), f"{case.describe()}: non-finite gradient of {n}"
        bound = 1e-7 * max(1.0, w.abs().max().item())
        err = (g - w).abs().max().item()
        assert err <= bound, f"{case.describe()}: gradient of {n} off by {err:.3g} > {bound:.3g}"


def run_case(case: Case) -> str:
    """Runs the call and checks the outcome; returns "ok" or "error"."""
    try:
        out = case.call()
    except (ValueError, RuntimeError, TypeError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        assert case.expect != "ok", f"{case.describe()}: a valid call raised {type(e).__name__}: {first}"
        assert _names_an_argument(first, _arg_names(case.op)), (
            f"{case.describe()}: the error does not name an argument: {type(e).__name__}: {first!r}"
        )
        return "error"
    assert case.expect != "error", f"{case.describe()}: returned a result; expected an error"
    got = _outputs(out)
    if case.ref is not None:
        try:
            expected = _outputs(case.ref(case.args))
        except Exception:  # noqa: BLE001 - the reference refused an argument the op took: nothing to compare
            assert case.expect != "ok", f"{case.describe()}: the reference failed on a valid call"
            return "ok"
        _compare(case, got, expected)
        if case.expect == "ok":
            _check_backward(case)
    elif case.expect == "ok" and _finite_inputs(case.args):
        # (A risky call may hold a finite but huge value, t = 3e38: overflow to Inf is then the right answer.)
        for o in got:
            assert torch.isfinite(o).all(), f"{case.describe()}: non-finite output from finite input"
    return "ok"


# ---- device mixes ---------------------------------------------------------------------------------------------------


def _tensor_slots(args: dict[str, Any]) -> list[tuple[str, int | None]]:
    """(name, index in a list or None) of every tensor argument, in argument order."""
    slots = []
    for name, v in args.items():
        if isinstance(v, torch.Tensor):
            slots.append((name, None))
        elif isinstance(v, list):
            slots.extend((name, i) for i, e in enumerate(v) if isinstance(e, torch.Tensor))
    return slots


def _get(args, slot):
    name, i = slot
    return args[name] if i is None else args[name][i]


def _set(args, slot, value):
    name, i = slot
    if i is None:
        args[name] = value
    else:
        args[name] = list(args[name])
        args[name][i] = value


def _exempt(slot, t: torch.Tensor) -> bool:
    """Whether a CPU tensor in this slot may mix with tensors of another device."""
    name, _ = slot
    return t.device.type == "cpu" and (name in HOST_OK or (name in HOST_SCALAR_OK and t.dim() == 0))


def check_devices(case: Case, plan: str, pick: int) -> None:
    args = dict(case.args)
    if isinstance(args.get("xs"), torch.Tensor):
        args["xs"] = list(args["xs"].unbind(0))
    slots = _tensor_slots(args)
    if plan == "all-meta":
        moved = [s for s in slots if not _exempt(s, _get(args, s))]
        if not moved:
            return
        cpu_out = _outputs(case.call(args))
        for s in moved:
            _set(args, s, _get(args, s).to("meta"))
        out = _outputs(case.call(args))
        for o, c in zip(out, cpu_out):
            assert o.device.type == "meta", f"{case.describe()}: all-meta call gave a {o.device} output"
            assert o.shape == c.shape, f"{case.describe()}: meta shape {tuple(o.shape)}, CPU {tuple(c.shape)}"
        return
    # One tensor argument on meta among CPU ones.
    if len(slots) < 2:
        return
    slot = slots[pick % len(slots)]
    _set(args, slot, _get(args, slot).to("meta"))
    first, rest = slots[0], slots[1:]
    first_t = _get(args, first)
    mixed = any(_get(args, s).device != first_t.device and not _exempt(s, _get(args, s)) for s in rest)
    try:
        out = case.call(args)
    except (ValueError, RuntimeError, TypeError) as e:
        first_line = str(e).splitlines()[0]
        assert mixed, f"{case.describe()} with {slot} on meta: a valid call raised {first_line!r}"
        assert "meta" in first_line and _names_an_argument(first_line, _arg_names(case.op)), first_line
        return
    assert not mixed, (
        f"{case.describe()} with {slot} on meta among CPU tensors returned {[o.device for o in _outputs(out)]}; "
        "expected an error naming the argument"
    )


# ---- risky calls: one argument replaced by something wrong or extreme -------------------------------------------

BAD_FLOATS = [-1.0, -1e-30, 0.0, 1.0, math.nan, math.inf, -math.inf, 1e300, -1e300, 2**64, 10**400]
BAD_INTS = [-1, 0, 1, 2**31, 2**62, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 10**30]
BAD_OBJECTS = ["3", None, True, 1.5, [1.0]]
INT_ARGS = {"n_moments", "window", "num_modalities"}
FLOAT_ARGS = {"sigma", "dt", "snr", "eta", "scale", "t", "alpha_bar_t", "alpha_bar_prev"}


def _bad_tensor(draw, t: torch.Tensor, name: str) -> torch.Tensor:
    kind = draw(st.sampled_from(["int", "bool", "other-float", "extra-dim", "fewer-dims", "zero-dim-size",
                                 "nan", "inf", "huge-values", "0-d", "complex", "sparse"]))
    if kind == "int":
        return t.to(torch.int64) if t.is_floating_point() else t.to(torch.int32)
    if kind == "bool":
        return t.to(torch.bool)
    if kind == "other-float":
        return t.to(F32 if t.dtype != F32 else F64) if t.is_floating_point() else t.to(F32)
    if kind == "extra-dim":
        return t.unsqueeze(0).expand(2, *t.shape)
    if kind == "fewer-dims":
        return t.reshape(-1)[: max(t.numel() - 1, 0)] if t.dim() <= 1 else t.flatten(0, 1)
    if kind == "zero-dim-size":
        return t.narrow(t.dim() - 1, 0, 0) if t.dim() else t
    if kind == "0-d":
        return t.reshape(-1)[0] if t.numel() else torch.tensor(1.0)
    if kind == "sparse":
        return t.to_sparse() if t.dim() else t
    if kind == "complex":
        return t.to(torch.complex64) if t.is_floating_point() else t
    if name == "lengths":
        huge = {"nan": -5, "inf": 2**62, "huge-values": 2**63 - 1}[kind]
        out = t.clone()
        if out.numel():
            out[draw(st.integers(0, out.numel() - 1))] = huge
        return out
    out = t.clone() if t.is_floating_point() else t.double()
    if out.numel():
        value = {"nan": math.nan, "inf": math.inf, "huge-values": torch.finfo(out.dtype).max}[kind]
        out.reshape(-1)[draw(st.integers(0, out.numel() - 1))] = value
    return out


@st.composite
def risky_case(draw, op: str):
    case = draw(BUILDERS[op]())
    args = dict(case.args)
    names = [n for n in args if n != "generator"]
    # Optional arguments the builder left out can be passed too (noise= next to generator=, a window, ...).
    for extra in _arg_names(op):
        if extra not in args and extra != "generator":
            names.append(extra)
    name = draw(st.sampled_from(names))
    current = args.get(name)
    if isinstance(current, torch.Tensor):
        args[name] = _bad_tensor(draw, current, name)
        label = f"bad {name}"
    elif isinstance(current, list):
        i = draw(st.integers(0, len(current) - 1))
        bad = list(current)
        bad[i] = _bad_tensor(draw, current[i], name)
        args[name] = draw(st.sampled_from([bad, bad[:1], []]))
        label = f"bad {name}"
    elif name in INT_ARGS:
        args[name] = draw(st.sampled_from(BAD_INTS + BAD_OBJECTS))
        label = f"{name}={args[name]!r}"
    elif name in FLOAT_ARGS or isinstance(current, float):
        args[name] = draw(st.sampled_from(BAD_FLOATS + BAD_OBJECTS))
        label = f"{name}={args[name]!r}"
    elif name == "noise":
        x = next(v for v in args.values() if isinstance(v, torch.Tensor))
        args[name] = draw(st.sampled_from([torch.zeros(x.shape[:-1] + (x.shape[-1] + 1,), dtype=x.dtype),
                                           torch.zeros_like(x)]))
        label = "noise (with generator)" if "generator" in args else "noise"
    else:
        args[name] = draw(st.sampled_from(["sparse", "", None, 3, -1.0, True]))
        label = f"{name}={args[name]!r}"
    return Case(op, args, case.ref, case.dtype, expect="either", tol=case.tol,
                magnitude=case.magnitude, label=label)


# ---- the tests ------------------------------------------------------------------------------------------------------


def test_every_public_op_is_fuzzed():
    assert set(BUILDERS) == set(OPS)


@pytest.mark.parametrize("op", OPS)
def test_valid_calls_match_the_reference(op):
    @settings(FUZZ, max_examples=VALID_EXAMPLES)
    @given(case=BUILDERS[op]())
    def run(case):
        run_case(case)

    run()


@pytest.mark.parametrize("op", OPS)
def test_device_mixes(op):
    @settings(FUZZ, max_examples=DEVICE_EXAMPLES)
    @given(case=BUILDERS[op](), plan=st.sampled_from(["all-meta", "one-meta"]), pick=st.integers(0, 7))
    def run(case, plan, pick):
        check_devices(case, plan, pick)

    run()


def _every_op_call() -> dict[str, tuple[Callable, dict[str, Any]]]:
    """One valid call of every op of the library, private ones included, by keyword."""
    ops = torch.ops.mmer_ext
    x, z = torch.randn(4, 3), torch.randn(4, 3)
    features, lengths = torch.randn(2, 5, 3), torch.tensor([2, 3])
    blocks = O.angular_adjacency(features, lengths, layout="blocks")
    adjacency, stats = ops._angular_adjacency_forward(features, lengths, 0.99999, True, None, "dense")
    _, moment_stats = ops._central_moments_forward(x, 3)
    _, pair_stats = ops._cmd_pairwise_forward([x, z], 3)
    h = torch.randn(10, 4)
    t = torch.full((4,), 0.5)
    q4, k4, mask4 = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 6, 5), torch.rand(4, 6) < 0.3
    out4, lse4, rng4 = ops.attention(q4, k4, k4, mask4, 0.2)
    return {
        "central_moments": (ops.central_moments, {"x": x, "n_moments": 3}),
        "_central_moments_forward": (ops._central_moments_forward, {"x": x, "n_moments": 3}),
        "_central_moments_backward": (ops._central_moments_backward,
                                      {"grad": torch.randn(3, 3), "x": x, "stats": moment_stats}),
        "cmd": (ops.cmd, {"x1": x, "x2": z}),
        "cmd_pairwise": (ops.cmd_pairwise, {"xs": [x, z, x]}),
        "_cmd_pairwise_forward": (ops._cmd_pairwise_forward, {"xs": [x, z], "n_moments": 3}),
        "_cmd_pairwise_backward": (ops._cmd_pairwise_backward,
                                   {"grad": torch.tensor(1.0), "xs": [x, z], "stats": pair_stats}),
        "angular_adjacency": (ops.angular_adjacency, {"features": features, "lengths": lengths}),
        "_angular_adjacency_forward": (ops._angular_adjacency_forward,
                                       {"features": features, "lengths": lengths, "scale": 0.99999,
                                        "normalize": True, "window": None, "layout": "dense"}),
        "_angular_adjacency_backward": (ops._angular_adjacency_backward,
                                        {"grad": torch.randn_like(adjacency), "features": features,
                                         "lengths": lengths, "stats": stats, "scale": 0.99999, "normalize": True,
                                         "window": None, "layout": "dense"}),
        "block_graph_propagate": (ops.block_graph_propagate,
                                  {"blocks": blocks, "x": h, "lengths": lengths, "num_modalities": 2}),
        "_block_graph_outer": (ops._block_graph_outer, {"a": h, "b": h, "lengths": lengths, "num_modalities": 2,
                                                        "slots": blocks.shape[1]}),
        "gcnii_layer": (ops.gcnii_layer, {"hi": h, "h0": h, "weight": torch.randn(8, 4), "theta": 0.1,
                                          "alpha": 0.1, "dropout": 0.2}),
        "_gcnii_layer_backward": (ops._gcnii_layer_backward,
                                  {"grad": h, "out": h, "hi": h, "h0": h, "weight": torch.randn(8, 4), "theta": 0.1,
                                   "alpha": 0.1, "dropout": 0.2}),
        "attention": (ops.attention, {"query": q4, "key": k4, "value": k4, "mask": mask4, "dropout": 0.2}),
        "_attention_backward": (ops._attention_backward,
                                {"grad": torch.randn_like(out4), "query": q4, "key": k4, "value": k4, "out": out4,
                                 "lse": lse4, "rng": rng4, "mask": mask4, "dropout": 0.2, "scale": None}),
        "ve_marginal_std": (ops.ve_marginal_std, {"t": t}),
        "ve_diffusion_coeff": (ops.ve_diffusion_coeff, {"t": t}),
        "ve_perturb": (ops.ve_perturb, {"x": x, "t": t, "noise": z}),
        "ve_sde_em_step": (ops.ve_sde_em_step, {"x": x, "score": z, "t": t, "dt": 0.01, "noise": x}),
        "ve_ode_step": (ops.ve_ode_step, {"x": x, "score": z, "t": t, "dt": 0.01}),
        "langevin_corrector_step": (ops.langevin_corrector_step, {"x": x, "score": z, "snr": 0.16, "noise": x}),
        "ddim_step": (ops.ddim_step, {"x_t": x, "eps": z, "alpha_bar_t": t, "alpha_bar_prev": t, "eta": 0.5,
                                      "noise": x}),
    }


_EVERY_OP = _every_op_call()
_META_SLOTS = [(op, slot) for op, (_, args) in _EVERY_OP.items() for slot in _tensor_slots(args)]


def test_every_op_of_the_library_is_listed():
    schemas = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("mmer_ext::")}
    assert set(_EVERY_OP) == schemas


@pytest.mark.parametrize(("op", "slot"), _META_SLOTS,
                         ids=[f"{op}-{n}{'' if i is None else i}" for op, (n, i) in _META_SLOTS])
def test_meta_mixed_with_cpu_is_refused(op, slot):
    # ve_perturb(cpu_x, 0.5, noise=meta) returned uninitialised CPU memory (values like 1.5e35): with a meta argument
    # the dispatcher ran the fake kernel, which returned x.new_empty(...). Every tensor argument of every op, each in
    # turn on meta among CPU ones (and, for the first argument, the others on the CPU), must raise naming it.
    fn, args = _EVERY_OP[op]
    args = dict(args)
    if len(_tensor_slots(args)) < 2:
        pytest.skip("a single tensor argument")
    _set(args, slot, _get(args, slot).to("meta"))
    slots = _tensor_slots(args)
    if all(_get(args, s).device.type == "meta" or _exempt(s, _get(args, s)) for s in slots):
        # Meta features with CPU lengths (read on the host) is a valid call: meta outputs.
        assert all(o.device.type == "meta" for o in _outputs(fn(**args)))
        return
    name = slot[0] if slot[1] is None else f"{slot[0]}\\[{slot[1]}\\]"
    with pytest.raises(RuntimeError, match=rf"(: {name} is on meta but \S+ is on cpu|is on cpu but {name} is on meta)"):
        fn(**args)


_X, _F, _L = torch.randn(4, 3), torch.randn(2, 7, 5), torch.tensor([3, 4])
# Calls whose errors named no argument (or were no clean error at all) before the fuzz suite found them: what they
# raised then, and the argument the message must now name.
FOUND = {
    "sigma-str": (lambda: O.ve_perturb(_X, 0.5, "a"), "sigma"),  # ValueError: could not convert string to float
    "sigma-None": (lambda: O.ve_marginal_std(0.5, None), "sigma"),  # TypeError: float() argument must be ...
    "dt-list": (lambda: O.ve_ode_step(_X, _X, 0.5, [0.1]), "dt"),  # TypeError: float() argument must be ...
    "snr-None": (lambda: O.langevin_corrector_step(_X, _X, None), "snr"),  # TypeError: float() argument must be ...
    "eta-str": (lambda: O.ddim_step(_X, _X, 0.5, 0.5, "a"), "eta"),  # ValueError: could not convert string ...
    "t-beyond-float": (lambda: O.ve_perturb(_X, 10**400), "t"),  # OverflowError: int too large to convert to float
    "alpha-beyond-float": (lambda: O.ddim_step(_X, _X, 10**400, 0.5), "alpha_bar_t"),  # OverflowError
    "sigma-beyond-float": (lambda: O.ve_marginal_std(0.5, 10**400), "sigma"),  # OverflowError
    "dt-beyond-float": (lambda: O.ve_sde_em_step(_X, _X, 0.5, 10**400), "dt"),  # OverflowError
    "sparse-x": (lambda: O.cmd(_X.to_sparse(), _X), "x1"),  # NotImplementedError: ... from the 'SparseCPU' backend
    "sparse-features": (lambda: O.angular_adjacency(_F.to_sparse(), _L), "features"),  # NotImplementedError
    "sparse-noise": (lambda: O.ve_perturb(_X, 0.5, noise=_X.to_sparse()), "noise"),  # NotImplementedError
    "n_moments-beyond-int64": (lambda: O.cmd(_X, _X, 2**63), "n_moments"),  # "expected int, found int"
    "n_moments-huge": (lambda: O.central_moments(torch.empty(3, 0), 2**40), "n_moments"),  # a [2^40, 0] result
    "dense-beyond-int64": (lambda: O.angular_adjacency(torch.empty(2, 2**31, 0), torch.tensor([2**31])),
                           "features"),  # the allocator's "can't allocate memory"
    "blocks-meta-lengths": (lambda: O.angular_adjacency(_F.to("meta"), _L.to("meta"), layout="blocks"),
                            "lengths"),  # "You're trying to run this operator with meta Tensors ..."
}


@pytest.mark.parametrize("case", list(FOUND))
def test_errors_found_by_the_fuzz_suite_name_the_argument(case):
    call, name = FOUND[case]
    with pytest.raises((ValueError, RuntimeError, TypeError)) as info:
        call()
    first = str(info.value).splitlines()[0]
    assert first.startswith("mmer_ext.") and _names_an_argument(first, (name,)), first


def run_risky(ops: list[str], examples: int = RISKY_EXAMPLES) -> None:
    """The risky calls of ``ops``; prints each before running it, so that a crash names its call."""
    for op in ops:

        @settings(FUZZ, max_examples=examples)
        @given(case=risky_case(op))
        def run(case):
            print("case:", case.describe(), file=sys.stderr, flush=True)
            run_case(case)

        run()
        print(f"done: {op}", file=sys.stderr, flush=True)


def test_risky_calls_in_a_subprocess():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--risky"], capture_output=True, text=True, env=env,
                          timeout=600)
    tail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-40:])
    if proc.returncode < 0:
        pytest.fail(f"the child process died from signal {-proc.returncode}; its last lines:\n{tail}")
    assert proc.returncode == 0, f"risky calls failed (exit {proc.returncode}):\n{tail}"
    for op in OPS:
        assert f"done: {op}" in proc.stderr, f"no risky calls were run for {op}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--risky"]:
        run_risky(sys.argv[2:] or OPS)
