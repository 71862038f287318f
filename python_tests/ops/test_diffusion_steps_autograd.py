"""Autograd, opcheck and torch.compile of the sampling-step ops (``mmer_ext.ops.diffusion_steps``).

The backward formulas are closed form (registered with ``torch.library.register_autograd``): float64 ``gradcheck``
checks them against finite differences, and float32 gradients are compared with autograd through the pure-PyTorch
references.
"""

from __future__ import annotations

import pytest
import torch

import mmer_ext  # noqa: F401  (loads the compiled library; registers torch.ops.mmer_ext)
from mmer_ext.ops import (
    ddim_step,
    langevin_corrector_step,
    ve_diffusion_coeff,
    ve_marginal_std,
    ve_ode_step,
    ve_perturb,
    ve_sde_em_step,
)
from mmer_ext.ops import _reference as ref
from op_testing import as_float64_cpu  # noqa: E402  (this folder, put on sys.path by pytest)

ops = torch.ops.mmer_ext
SIGMA = 25.0
DT = 0.05
SNR = 0.3
ETA = 0.6


def _inputs(shape, dtype=torch.float64, device="cpu", requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for _ in range(3)]
    return [v.requires_grad_(requires_grad) for v in out]


def _t(batch, device="cpu", dtype=torch.float64, lo=0.05, hi=0.95, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (lo + (hi - lo) * torch.rand(batch, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)


# One function per differentiable configuration: (name, fn(x, s, z) -> outputs, which of (x, s, z) it uses).
def _cases(device, batch=3):
    t_b = _t(batch, device)
    ab_t = _t(batch, device, lo=0.1, hi=0.5)
    ab_prev = _t(batch, device, lo=0.6, hi=0.99, seed=2)
    return {
        "ve_perturb": (lambda x, s, z: ve_perturb(x, t_b, SIGMA, noise=z), (0, 2)),
        "ve_perturb-0d": (lambda x, s, z: ve_perturb(x, torch.tensor(0.4), SIGMA, noise=z), (0, 2)),
        "ve_sde_em_step": (lambda x, s, z: ve_sde_em_step(x, s, t_b, DT, SIGMA, noise=z), (0, 1, 2)),
        "ve_sde_em_step-float": (lambda x, s, z: ve_sde_em_step(x, s, 0.3, DT, 3.0, noise=z), (0, 1, 2)),
        "ve_ode_step": (lambda x, s, z: ve_ode_step(x, s, t_b, DT, SIGMA), (0, 1)),
        "langevin": (lambda x, s, z: langevin_corrector_step(x, s, SNR, noise=z), (0, 1, 2)),
        "ddim": (lambda x, s, z: ddim_step(x, s, ab_t, ab_prev, ETA, noise=z), (0, 1, 2)),
        "ddim-eta0": (lambda x, s, z: ddim_step(x, s, 0.3, 0.8), (0, 1)),
        "ddim-eta1-float": (lambda x, s, z: ddim_step(x, s, 0.3, 0.8, 1.0, noise=z), (0, 1, 2)),
    }


CASES = list(_cases("cpu"))


def _differentiable(case: str, shape: tuple[int, ...]):
    """``(f, args)``: the case's op as a function of just the inputs it differentiates (the others held fixed)."""
    fn, used = _cases("cpu")[case]
    x, s, z = _inputs(shape, requires_grad=True)

    def f(*a):
        full = [x, s, z]
        for i, v in zip(used, a):
            full[i] = v
        return fn(*full)

    return f, [(x, s, z)[i] for i in used]


@pytest.mark.parametrize("case", CASES)
def test_gradcheck(case):
    assert torch.autograd.gradcheck(*_differentiable(case, (3, 2, 5)))


@pytest.mark.parametrize("case", ["ve_perturb", "ve_sde_em_step", "ve_ode_step", "langevin", "ddim"])
def test_gradgradcheck(case):
    # The backward formulas are built from torch ops on saved inputs / outputs, so second derivatives are exact
    # (zero for the affine ops; through the step size for Langevin).
    assert torch.autograd.gradgradcheck(*_differentiable(case, (3, 5)))


def test_gradgradcheck_langevin_in_kernel_noise():
    x, s, _ = _inputs((3, 5), requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda a, b: langevin_corrector_step(a, b, SNR, generator=torch.Generator().manual_seed(1)), (x, s)
    )


def test_gradcheck_langevin_in_kernel_noise():
    # The score gradient goes through the step size; with in-kernel noise the backward reads the noise term back as
    # x_next - x_mean. A fresh generator with a fixed seed makes the op a deterministic function for gradcheck.
    x, s, _ = _inputs((3, 7), requires_grad=True)

    def f(a, b):
        return langevin_corrector_step(a, b, SNR, generator=torch.Generator().manual_seed(5))

    assert torch.autograd.gradcheck(f, (x, s))


def test_gradcheck_langevin_zero_score_sample():
    # A sample with a zero score has step size 0; its gradients are defined as zero, never NaN.
    x, s, z = _inputs((3, 6), requires_grad=True)
    with torch.no_grad():
        s[1] = 0
    outs = langevin_corrector_step(x, s, SNR, noise=z)
    grads = torch.autograd.grad(sum(o.sum() for o in outs), (x, s, z))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[1][1], torch.zeros_like(grads[1][1]))
    assert torch.equal(grads[2][1], torch.zeros_like(grads[2][1]))


@pytest.mark.parametrize("fn", [ve_marginal_std, ve_diffusion_coeff])
def test_gradcheck_coefficients_in_t(fn):
    t = _t(7).reshape(7, 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: fn(a, SIGMA), (t,))
    assert torch.autograd.gradcheck(lambda a: fn(a, 2.5), (t,))


@pytest.mark.parametrize("case", CASES)
def test_float32_grads_match_reference_autograd(case):
    fn, used = _cases("cpu", batch=4)[case]
    ref_fn = _ref_cases(batch=4)[case]
    x, s, z = _inputs((4, 3, 6), dtype=torch.float32, requires_grad=True)
    outs = fn(x, s, z)
    outs = outs if isinstance(outs, tuple) else (outs,)
    cotangents = [torch.randn_like(o) for o in outs]
    wrt = [(x, s, z)[i] for i in used]
    got = torch.autograd.grad(outs, wrt, cotangents)
    xr, sr, zr = (as_float64_cpu(v, requires_grad=True) for v in (x, s, z))
    routs = ref_fn(xr, sr, zr)
    routs = routs if isinstance(routs, tuple) else (routs,)
    expected = torch.autograd.grad(routs, [(xr, sr, zr)[i] for i in used], [c.double() for c in cotangents])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e.float(), rtol=1e-5, atol=1e-5)


def _ref_cases(batch):
    t_b = _t(batch)
    ab_t = _t(batch, lo=0.1, hi=0.5)
    ab_prev = _t(batch, lo=0.6, hi=0.99, seed=2)
    return {
        "ve_perturb": lambda x, s, z: ref.ve_perturb_ref(x, t_b, SIGMA, noise=z),
        "ve_perturb-0d": lambda x, s, z: ref.ve_perturb_ref(x, torch.tensor(0.4), SIGMA, noise=z),
        "ve_sde_em_step": lambda x, s, z: ref.ve_sde_em_step_ref(x, s, t_b, DT, SIGMA, noise=z),
        "ve_sde_em_step-float": lambda x, s, z: ref.ve_sde_em_step_ref(x, s, 0.3, DT, 3.0, noise=z),
        "ve_ode_step": lambda x, s, z: ref.ve_ode_step_ref(x, s, t_b, DT, SIGMA),
        "langevin": lambda x, s, z: ref.langevin_corrector_step_ref(x, s, SNR, noise=z),
        "ddim": lambda x, s, z: ref.ddim_step_ref(x, s, ab_t, ab_prev, ETA, noise=z),
        "ddim-eta0": lambda x, s, z: ref.ddim_step_ref(x, s, 0.3, 0.8),
        "ddim-eta1-float": lambda x, s, z: ref.ddim_step_ref(x, s, 0.3, 0.8, 1.0, noise=z),
    }


def test_parameters_are_not_differentiable():
    # t / alpha_bar of the step ops get no gradient (documented); the coefficient ops are differentiable in t.
    x, s, z = _inputs((3, 4), requires_grad=True)
    t = _t(3).requires_grad_()
    nxt, mean = ve_sde_em_step(x, s, t, DT, noise=z)
    (gt,) = torch.autograd.grad(nxt.sum() + mean.sum(), t, allow_unused=True)
    assert gt is None or torch.equal(gt, torch.zeros_like(gt))


def test_generator_path_grads_match_noise_path():
    # Gradients in x and score do not depend on where the noise comes from: feed the noise the generator drew (read
    # back from the outputs) through the noise= path and compare.
    x, s, _ = _inputs((3, 9), requires_grad=True)
    gen_out = ve_sde_em_step(x, s, 0.4, DT, SIGMA, generator=torch.Generator().manual_seed(3))
    z = ((gen_out[0] - gen_out[1]) / (DT**0.5 * SIGMA**0.4)).detach()
    noise_out = ve_sde_em_step(x, s, 0.4, DT, SIGMA, noise=z)
    cot = [torch.randn_like(o) for o in gen_out]
    for a, b in zip(torch.autograd.grad(gen_out, (x, s), cot), torch.autograd.grad(noise_out, (x, s), cot)):
        torch.testing.assert_close(a, b)
    gen_out = langevin_corrector_step(x, s, SNR, generator=torch.Generator().manual_seed(4))
    eps = ((gen_out[1] - x) * s).sum(1, keepdim=True) / (s * s).sum(1, keepdim=True)
    z = ((gen_out[0] - gen_out[1]) / torch.sqrt(2 * eps)).detach()
    noise_out = langevin_corrector_step(x, s, SNR, noise=z)
    for a, b in zip(torch.autograd.grad(gen_out, (x, s), cot), torch.autograd.grad(noise_out, (x, s), cot)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# ---- opcheck ------------------------------------------------------------------------------------------------------


def _opcheck_cases(device):
    """(id, op, args, kwargs, positions of the differentiable tensor args, names of differentiable kwargs)."""
    x, s, z = _inputs((3, 2, 5), device=device)
    t_b = _t(3, device)
    t0 = torch.tensor(0.4, dtype=torch.float64)
    ab_t, ab_prev = _t(3, device, lo=0.1, hi=0.5), _t(3, device, lo=0.6, hi=0.99, seed=2)
    return [
        ("ve_marginal_std", ops.ve_marginal_std.default, (t_b.reshape(3, 1), SIGMA), {}, (0,), ()),
        ("ve_diffusion_coeff", ops.ve_diffusion_coeff.default, (t_b, 2.0), {}, (0,), ()),
        ("ve_perturb", ops.ve_perturb.default, (x, t_b, SIGMA), {"noise": z}, (0,), ("noise",)),
        ("ve_perturb-0d", ops.ve_perturb.default, (x, t0, SIGMA), {"noise": z}, (0,), ("noise",)),
        ("ve_sde_em_step", ops.ve_sde_em_step.default, (x, s, t_b, DT, SIGMA), {"noise": z}, (0, 1), ("noise",)),
        ("ve_sde_em_step-0d", ops.ve_sde_em_step.default, (x, s, t0, DT), {"noise": z}, (0, 1), ("noise",)),
        ("ve_ode_step", ops.ve_ode_step.default, (x, s, t_b, DT, SIGMA), {}, (0, 1), ()),
        ("langevin_corrector_step", ops.langevin_corrector_step.default, (x, s, SNR), {"noise": z}, (0, 1), ("noise",)),
        ("ddim_step", ops.ddim_step.default, (x, s, ab_t, ab_prev, ETA), {"noise": z}, (0, 1), ("noise",)),
        ("ddim_step-eta0", ops.ddim_step.default, (x, s, ab_t, t0, 0.0), {}, (0, 1), ()),
    ]


OPCHECK_IDS = [c[0] for c in _opcheck_cases("cpu")]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("case", OPCHECK_IDS)
def test_opcheck(case, requires_grad, device):
    cases = {c[0]: c[1:] for c in _opcheck_cases(device)}
    op, args, kwargs, grad_args, grad_kwargs = cases[case]
    if requires_grad:
        args = tuple(a.detach().clone().requires_grad_() if i in grad_args else a for i, a in enumerate(args))
        kwargs = {k: v.detach().clone().requires_grad_() if k in grad_kwargs else v for k, v in kwargs.items()}
    torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize(
    "name, args",
    [
        ("ve_perturb", lambda x, s: (x, torch.tensor(0.5), SIGMA)),
        ("ve_sde_em_step", lambda x, s: (x, s, torch.tensor(0.5), DT, SIGMA)),
        ("langevin_corrector_step", lambda x, s: (x, s, SNR)),
        ("ddim_step", lambda x, s: (x, s, torch.tensor(0.3), torch.tensor(0.7), ETA)),
    ],
)
def test_opcheck_generator_path(name, args, device):
    # With generator= each call draws fresh noise, so opcheck's eager-vs-AOT comparison (which calls the op twice)
    # cannot hold; schema, autograd registration and the fake kernel are still checked.
    x, s, _ = _inputs((3, 2, 5), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    torch.library.opcheck(
        getattr(ops, name).default,
        args(x, s),
        {"generator": gen},
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_opcheck_covers_every_op():
    import mmer_ext.ops.diffusion_steps as module

    tested = {c[0].split("-")[0] for c in _opcheck_cases("cpu")}
    assert tested == set(module.__all__)


# ---- torch.compile ------------------------------------------------------------------------------------------------


def _sampler_loop(x, cond, z, ts):
    """A few steps of every op, as a sampler would chain them (noise= path)."""
    for i in range(2):
        t = ts[i]
        c = ve_perturb(cond, t, SIGMA, noise=z)
        score = -(x - c) / (1.0 + ve_marginal_std(t, SIGMA).reshape(-1, 1, 1) ** 2)
        x, mean = ve_sde_em_step(x, score, t, 0.1, SIGMA, noise=z)
        x = ve_ode_step(x, score, t, 0.1, SIGMA) + 0.0 * ve_diffusion_coeff(t).reshape(-1, 1, 1)
        x, mean = langevin_corrector_step(x, score, 0.16, noise=z)
        x, x0 = ddim_step(x, score, 0.5, 0.7, 0.3, noise=z)
    return mean + x0


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph_matches_eager(dynamic):
    compiled = torch.compile(_sampler_loop, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for B in (3, 5):
        x, cond, z = _inputs((B, 4, 6), dtype=torch.float32)
        ts = _t(2 * B, dtype=torch.float32).reshape(2, B)
        torch.testing.assert_close(compiled(x, cond, z, ts), _sampler_loop(x, cond, z, ts))


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_inductor_with_backward():
    def f(x, s, z, t):
        nxt, mean = ve_sde_em_step(x * 2, s, t, DT, SIGMA, noise=z)
        a, b = langevin_corrector_step(nxt, s, SNR, noise=z)
        return (a.sin() + b).sum()

    compiled = torch.compile(f, fullgraph=True)
    x, s, z = _inputs((3, 8), dtype=torch.float32, requires_grad=True)
    t = _t(3, dtype=torch.float32)
    out = compiled(x, s, z, t)
    grads = torch.autograd.grad(out, (x, s, z))
    xe, se, ze = (v.detach().clone().requires_grad_() for v in (x, s, z))
    expected = f(xe, se, ze, t)
    expected_grads = torch.autograd.grad(expected, (xe, se, ze))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_fullgraph_default_generator():
    # Neither noise= nor generator=: the op draws from the default generator inside the kernel, and traces as one
    # graph node; the compiled function consumes the same random stream as the eager one.
    def f(x, s):
        nxt, _ = ve_sde_em_step(x, s, 0.5, DT, SIGMA)
        return langevin_corrector_step(nxt, s, SNR)[0]

    x, s, _ = _inputs((3, 8), dtype=torch.float32)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(21)
    got = compiled(x, s)
    torch.manual_seed(21)
    expected = f(x, s)
    assert torch.equal(got, expected)
    assert not torch.equal(compiled(x, s), got)  # the stream advances


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_generator_argument_graph_breaks():
    # Dynamo (torch 2.14) cannot put a torch.Generator object into a graph as an argument of a custom op ("Missing
    # as_proxy() implementation"), so generator= is not fullgraph-compilable: fullgraph=True raises, and without it
    # the op runs eagerly between graphs, with the eager result.
    gen = torch.Generator().manual_seed(11)

    def f(x, s):
        return ve_sde_em_step(x * 1.5, s, 0.5, DT, SIGMA, generator=gen)

    x, s, _ = _inputs((3, 8), dtype=torch.float32)
    with pytest.raises(Exception, match="as_proxy|Generator|graph break"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(x, s)
    torch._dynamo.reset()
    gen.manual_seed(11)
    got = torch.compile(f, backend="aot_eager")(x, s)
    gen.manual_seed(11)
    expected = f(x, s)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
