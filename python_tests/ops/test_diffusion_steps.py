"""Tests of the sampling-step ops (``mmer_ext.ops.diffusion_steps``): forward parity with the pure-PyTorch references
on the ``noise=`` path, shapes, layouts and parameter forms, numeric anchors computed from IMDer's code (github.com/mdswyz/IMDer), and argument
errors. Autograd/opcheck/compile: test_diffusion_steps_autograd.py; in-kernel noise and CUDA-only behaviour:
test_diffusion_steps_noise.py.

Oracle: the ``*_ref`` functions of ``mmer_ext.ops._reference``, run on exactly the tensors the op saw. Both compute the
coefficients in float64 and round them to the dtype once, so CPU results agree to a few ulps.
"""

from __future__ import annotations

import math

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
from op_testing import dtype_id, place, shape_id  # noqa: E402  (this folder, put on sys.path by pytest)

SIGMA = 25.0
DT = 0.999 / 99  # IMDer's Euler-Maruyama step (github.com/mdswyz/IMDer)
SNR = 0.16
ETA = 0.7
STEP_OPS = ["ve_perturb", "ve_sde_em_step", "ve_ode_step", "langevin_corrector_step", "ddim_step"]
NOISY_OPS = ["ve_perturb", "ve_sde_em_step", "langevin_corrector_step", "ddim_step"]
# B = 0, B = 1, odd trailing sizes (groups of 4 straddle samples), IMDer's [B, 32, 48], and 3 x 70001 elements:
# several CPU tasks and several norm chunks per sample for Langevin.
SHAPES = [(0, 5), (1, 1), (1, 7), (3, 5), (2, 3, 7), (4, 32, 48), (5, 1, 1, 3), (3, 70001)]
PARAM_FORMS = ["float", "0d", "batch"]

OPS = {
    "ve_perturb": ve_perturb,
    "ve_sde_em_step": ve_sde_em_step,
    "ve_ode_step": ve_ode_step,
    "langevin_corrector_step": langevin_corrector_step,
    "ddim_step": ddim_step,
}
REFS = {
    "ve_perturb": ref.ve_perturb_ref,
    "ve_sde_em_step": ref.ve_sde_em_step_ref,
    "ve_ode_step": ref.ve_ode_step_ref,
    "langevin_corrector_step": ref.langevin_corrector_step_ref,
    "ddim_step": ref.ddim_step_ref,
}


def _params(name: str, batch: int, form: str, device, dtype=torch.float64):
    """The op's per-sample parameters (t, or alpha_bar_t and alpha_bar_prev) in the given form."""
    g = torch.Generator().manual_seed(batch + 7)
    if name == "ddim_step":
        ab_t = 0.05 + 0.8 * torch.rand(batch, generator=g, dtype=torch.float64)
        ab_prev = ab_t + (1.0 - ab_t) * torch.rand(batch, generator=g, dtype=torch.float64)
        values = [ab_t, ab_prev]
    else:
        values = [1e-3 + (1.0 - 1e-3) * torch.rand(batch, generator=g, dtype=torch.float64)]
    if form == "batch":
        return [v.to(device=device, dtype=dtype) for v in values]
    scalars = [0.31, 0.77] if name == "ddim_step" else [0.43]
    if form == "float":
        return scalars
    if form == "0d":
        return [torch.tensor(s, dtype=dtype, device=device) for s in scalars]
    raise ValueError(form)


def call(name: str, x, score, params, noise=None, *, generator=None, reference=False):
    """The op (or its reference) with this suite's constants; returns a tuple of outputs."""
    f = REFS[name] if reference else OPS[name]
    kw = {} if name == "ve_ode_step" else ({"noise": noise} if reference else {"noise": noise, "generator": generator})
    if name == "ve_perturb":
        out = f(x, params[0], SIGMA, **kw)
    elif name == "ve_sde_em_step":
        out = f(x, score, params[0], DT, SIGMA, **kw)
    elif name == "ve_ode_step":
        out = f(x, score, params[0], DT, SIGMA)
    elif name == "langevin_corrector_step":
        out = f(x, score, SNR, **kw)
    else:
        out = f(x, score, params[0], params[1], ETA, **kw)
    return out if isinstance(out, tuple) else (out,)


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, s, z = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    return [v.to(device=device, dtype=dtype) for v in (x, s, z)]


def _tol(x: torch.Tensor) -> dict:
    # CUDA computes per-sample coefficients in the math type (float32 for float32 data): sigma^(2t) then carries a
    # few float32 ulps of t * ln(sigma) (~1e-6 relative).
    if x.is_cuda and x.dtype != torch.float64:
        return {"rtol": 2e-5, "atol": 2e-5}
    return {}


def _assert_parity(name, x, s, z, params, **tol):
    tol = tol or _tol(x)
    noise = None if name == "ve_ode_step" else z
    got = call(name, x, s, params, noise)
    expected = call(name, x, s, params, noise, reference=True)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == x.shape and a.dtype == x.dtype and a.device == x.device
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, **tol)


# ---- parity with the references -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("name", STEP_OPS)
def test_matches_reference(name, shape, dtype, device):
    x, s, z = _inputs(shape, dtype, device)
    for form in PARAM_FORMS:
        _assert_parity(name, x, s, z, _params(name, shape[0], form, device))


@pytest.mark.parametrize("form", PARAM_FORMS)
@pytest.mark.parametrize("name", STEP_OPS)
def test_param_forms(name, form, device):
    x, s, z = _inputs((6, 3, 5), torch.float64, device)
    _assert_parity(name, x, s, z, _params(name, 6, form, device))


@pytest.mark.parametrize("name", STEP_OPS)
def test_float32_params_with_float64_state(name, device):
    # Parameters of another floating dtype than x are fine: they are read in float64 (CPU) / x's math type.
    x, s, z = _inputs((4, 9), torch.float64, device)
    params = _params(name, 4, "batch", device, dtype=torch.float32)
    _assert_parity(name, x, s, z, params)


@pytest.mark.parametrize("name", STEP_OPS)
def test_batch_param_equals_per_sample_scalar_calls(name, device):
    # A [B] parameter applies value b to sample b: the same as B calls with 0-d parameters on one-sample slices.
    x, s, z = _inputs((5, 2, 3), torch.float64, device)
    params = _params(name, 5, "batch", device)
    noise = None if name == "ve_ode_step" else z
    batched = call(name, x, s, params, noise)
    for b in range(5):
        single = call(name, x[b : b + 1], s[b : b + 1], [p[b] for p in params], None if noise is None else z[b : b + 1])
        for got, exp in zip(batched, single):
            torch.testing.assert_close(got[b : b + 1], exp, rtol=1e-14, atol=1e-14)


def _strided(v: torch.Tensor, layout: str) -> torch.Tensor:
    return place(v, v.device, v.dtype, layout)


@pytest.mark.parametrize("layout", ["transposed", "step", "offset"])
@pytest.mark.parametrize("name", STEP_OPS)
def test_strided_inputs(name, layout, device):
    x, s, z = _inputs((4, 6, 5), torch.float32, device)
    params = _params(name, 4, "batch", device)
    noise = None if name == "ve_ode_step" else z
    expected = call(name, x, s, params, noise, reference=True)
    got = call(name, _strided(x, layout), _strided(s, "step"), params, None if noise is None else _strided(z, layout))
    for a, b in zip(got, expected):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, **_tol(x))


@pytest.mark.parametrize("name", STEP_OPS)
def test_batch_param_may_be_strided(name, device):
    x, s, z = _inputs((4, 7), torch.float64, device)
    params = _params(name, 8, "batch", device)
    strided = [p[::2] for p in params]
    _assert_parity(name, x, s, z, strided)


def test_em_step_is_imder_update(device):
    # IMDer's loop body, as its code writes it in float32: g = sigma ** t (t a [B] tensor), then
    # mean = x + g^2 * score * dt; x = mean + sqrt(dt) * g * z.
    x, s, z = _inputs((8, 32, 48), torch.float32, device)
    t = torch.full((8,), 0.7, device=device)
    g = SIGMA**t
    mean = x + (g**2)[:, None, None] * s * DT
    nxt = mean + math.sqrt(DT) * g[:, None, None] * z
    got_next, got_mean = ve_sde_em_step(x, s, t, DT, SIGMA, noise=z)
    torch.testing.assert_close(got_mean, mean, **_tol(x))
    torch.testing.assert_close(got_next, nxt, **_tol(x))


def test_langevin_zero_score_sample_is_left_unchanged(device):
    x, s, z = _inputs((3, 10), torch.float64, device)
    s[1] = 0
    x_next, x_mean = langevin_corrector_step(x, s, SNR, noise=z)
    assert torch.equal(x_next[1], x[1]) and torch.equal(x_mean[1], x[1])
    exp_next, exp_mean = ref.langevin_corrector_step_ref(x, s, SNR, noise=z)
    torch.testing.assert_close(x_next, exp_next)
    torch.testing.assert_close(x_mean, exp_mean)


def test_langevin_step_size_is_per_sample(device):
    # Scaling one sample's score by k divides its step size by k^2 and leaves the other samples alone.
    x, s, z = _inputs((2, 50), torch.float64, device)
    _, mean = langevin_corrector_step(x, s, SNR, noise=z)
    s2 = s.clone()
    s2[0] *= 3.0
    _, mean2 = langevin_corrector_step(x, s2, SNR, noise=z)
    torch.testing.assert_close(mean2[1], mean[1], rtol=0, atol=0)
    torch.testing.assert_close(mean2[0] - x[0], (mean[0] - x[0]) / 3.0)
    eps = 2 * (SNR * z[0].norm() / s[0].norm()) ** 2
    torch.testing.assert_close(mean[0] - x[0], eps * s[0])


def test_ddim_eta_zero_ignores_noise(device):
    x, s, z = _inputs((3, 4), torch.float64, device)
    a = ddim_step(x, s, 0.3, 0.6, 0.0)
    b = ddim_step(x, s, 0.3, 0.6, 0.0, noise=z)
    gen = torch.Generator(device=device).manual_seed(1)
    state = gen.get_state()
    c = ddim_step(x, s, 0.3, 0.6, 0.0, generator=gen)
    assert torch.equal(gen.get_state(), state)  # deterministic DDIM draws nothing
    for u, v, w in zip(a, b, c):
        assert torch.equal(u, v) and torch.equal(u, w)


def test_ddim_recovers_x0_from_exact_eps(device):
    # x_t = sqrt(ab) x0 + sqrt(1 - ab) eps exactly: x0_pred must be x0, and eta = 0 maps to the same x0 at ab_prev.
    x0, eps, _ = _inputs((4, 11), torch.float64, device)
    ab_t, ab_prev = 0.2, 0.9
    x_t = math.sqrt(ab_t) * x0 + math.sqrt(1 - ab_t) * eps
    x_prev, x0_pred = ddim_step(x_t, eps, ab_t, ab_prev)
    torch.testing.assert_close(x0_pred, x0)
    torch.testing.assert_close(x_prev, math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps)


def test_ddim_eta_one_is_ddpm_posterior_std(device):
    # eta = 1: s^2 = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev), the DDPM posterior variance.
    x, s, z = _inputs((2, 3), torch.float64, device)
    ab_t, ab_prev = 0.3, 0.5
    zero = torch.zeros_like(z)
    x_prev, _ = ddim_step(x, s, ab_t, ab_prev, 1.0, noise=z)
    x_det, _ = ddim_step(x, s, ab_t, ab_prev, 1.0, noise=zero)
    std = math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
    torch.testing.assert_close(x_prev - x_det, std * z)


def test_ddim_edge_alpha_bars(device):
    # ab_t = 1 (no noise left) and ab_t > ab_prev (a step the wrong way) give s = 0, not NaN.
    x, s, z = _inputs((3, 5), torch.float64, device)
    for ab_t, ab_prev in [(1.0, 1.0), (1.0, 0.5), (0.8, 0.4)]:
        out = ddim_step(x, s, ab_t, ab_prev, 1.0, noise=z)
        exp = ref.ddim_step_ref(x, s, ab_t, ab_prev, 1.0, noise=z)
        for a, b in zip(out, exp):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b)


def test_ode_step_is_half_the_em_drift(device):
    x, s, _ = _inputs((3, 8), torch.float64, device)
    _, mean = ve_sde_em_step(x, s, 0.6, DT, SIGMA, noise=torch.zeros_like(x))
    ode = ve_ode_step(x, s, 0.6, DT, SIGMA)
    torch.testing.assert_close(ode - x, 0.5 * (mean - x))


def test_zero_dt_is_identity(device):
    x, s, z = _inputs((2, 5), torch.float64, device)
    nxt, mean = ve_sde_em_step(x, s, 0.5, 0.0, noise=z)
    assert torch.equal(nxt, x) and torch.equal(mean, x)


def test_meta_tensors_give_shapes():
    x = torch.empty(4, 3, 5, device="meta")
    t = torch.empty(4, device="meta")
    assert ve_perturb(x, t, noise=x).shape == x.shape
    assert [o.shape for o in ve_sde_em_step(x, x, t, DT, noise=x)] == [x.shape, x.shape]
    assert ve_ode_step(x, x, 0.5, DT).device.type == "meta"
    assert [o.shape for o in langevin_corrector_step(x, x, SNR, noise=x)] == [x.shape, x.shape]
    assert [o.shape for o in ddim_step(x, x, t, t, 0.0)] == [x.shape, x.shape]


# ---- VE SDE coefficients: anchors from IMDer's code ---------------------------------------------------------------


@pytest.mark.parametrize(
    "t, expected, tol",
    [(1.0, 9.8452, 5e-5), (1e-3, 0.03167, 5e-6), (1e-5, 0.003162, 5e-7)],
)
def test_marginal_std_anchors(t, expected, tol, device):
    for value in (t, torch.tensor(t, device=device), torch.tensor([t], dtype=torch.float64, device=device)):
        got = ve_marginal_std(value, SIGMA)
        assert abs(float(got.reshape(-1)[0]) - expected) < tol


def test_diffusion_coeff_anchor(device):
    assert float(ve_diffusion_coeff(1.0)) == pytest.approx(25.0, rel=1e-6)
    assert float(ve_diffusion_coeff(torch.tensor(0.0, device=device))) == 1.0
    assert DT == pytest.approx(0.010091, abs=5e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_coefficients_match_reference(dtype, device):
    t = torch.linspace(0.0, 1.0, 101, dtype=dtype, device=device).reshape(101, 1)
    for sigma in (25.0, 2.0, 0.5):
        torch.testing.assert_close(ve_marginal_std(t, sigma), ref.ve_marginal_std_ref(t, sigma))
        torch.testing.assert_close(ve_diffusion_coeff(t, sigma), ref.ve_diffusion_coeff_ref(t, sigma))
        assert ve_marginal_std(t, sigma).shape == t.shape


def test_marginal_std_is_precise_near_zero():
    # IMDer's (sigma^(2t) - 1) form loses ~3 digits in float32 at t = 1e-5; expm1 keeps full relative precision.
    t = torch.tensor([1e-7, 1e-5, 1e-3], dtype=torch.float32)
    exact = ve_marginal_std(t.double())
    got = ve_marginal_std(t)
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=0)


def test_float_time_uses_default_dtype():
    assert ve_marginal_std(0.5).dtype == torch.get_default_dtype()
    assert ve_marginal_std(0.5).dim() == 0


# ---- bad arguments ------------------------------------------------------------------------------------------------


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def test_shape_mismatch():
    x = _x(4, 3)
    with pytest.raises(RuntimeError, match=r"ve_sde_em_step: score has shape \[4, 4\] but x has shape \[4, 3\]"):
        ve_sde_em_step(x, _x(4, 4), 0.5, DT)
    with pytest.raises(RuntimeError, match=r"ve_perturb: noise has shape \[3, 3\] but x has shape \[4, 3\]"):
        ve_perturb(x, 0.5, noise=_x(3, 3))
    with pytest.raises(RuntimeError, match=r"ddim_step: eps has shape"):
        ddim_step(x, _x(4), 0.5, 0.6)


def test_wrong_dtype():
    x = _x(4, 3)
    with pytest.raises(RuntimeError, match=r"langevin_corrector_step: score has dtype Double but x has Float"):
        langevin_corrector_step(x, _x(4, 3, dtype=torch.float64), SNR)
    with pytest.raises(RuntimeError, match=r"ve_perturb: noise has dtype Double but x has Float"):
        ve_perturb(x, 0.5, noise=_x(4, 3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_tensors(dtype):
    xi = torch.ones(4, 3, dtype=dtype)
    with pytest.raises(RuntimeError, match=r"ve_ode_step: x must be float32, float64, float16 or bfloat16"):
        ve_ode_step(xi, xi, 0.5, DT)
    with pytest.raises(RuntimeError, match=r"ve_perturb: noise must be float32"):
        ve_perturb(_x(4, 3), 0.5, noise=xi)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_cuda_only(dtype):
    x = _x(4, 3).to(dtype)
    with pytest.raises(RuntimeError, match=r"ve_sde_em_step: x on the CPU must be float32 or float64"):
        ve_sde_em_step(x, x, 0.5, DT)


def test_noise_and_generator_are_exclusive():
    x = _x(4, 3)
    gen = torch.Generator().manual_seed(0)
    for name in NOISY_OPS:
        with pytest.raises(RuntimeError, match=rf"{name}: pass noise= .* or generator= .*, not both"):
            call(name, x, x, _params(name, 4, "float", "cpu"), x, generator=gen)


def test_time_of_wrong_length():
    x = _x(4, 3)
    with pytest.raises(RuntimeError, match=r"ve_sde_em_step: t has 3 values but x has batch size 4"):
        ve_sde_em_step(x, x, torch.rand(3), DT)
    with pytest.raises(RuntimeError, match=r"ddim_step: alpha_bar_prev has 5 values but x_t has batch size 4"):
        ddim_step(x, x, 0.5, torch.full((5,), 0.7))
    with pytest.raises(RuntimeError, match=r"ve_perturb: t must be a Python float, a 0-d tensor or a \[B\] tensor"):
        ve_perturb(x, torch.rand(4, 1))


def test_time_of_wrong_type():
    x = _x(4, 3)
    with pytest.raises(RuntimeError, match=r"ve_ode_step: t must be a Python float or a floating-point tensor"):
        ve_ode_step(x, x, torch.ones(4, dtype=torch.int64), DT)
    with pytest.raises(TypeError, match=r"ve_perturb: t must be a float or a tensor, got str"):
        ve_perturb(x, "0.5")
    with pytest.raises(TypeError, match=r"ve_marginal_std: t must be a float or a tensor, got NoneType"):
        ve_marginal_std(None)


def test_negative_dt():
    x = _x(4, 3)
    with pytest.raises(RuntimeError, match=r"ve_sde_em_step: dt must be finite and >= 0"):
        ve_sde_em_step(x, x, 0.5, -0.01)
    with pytest.raises(RuntimeError, match=r"ve_ode_step: dt must be finite and >= 0"):
        ve_ode_step(x, x, 0.5, float("nan"))


T_OPS = {
    "ve_marginal_std": lambda x, t: ve_marginal_std(t),
    "ve_diffusion_coeff": lambda x, t: ve_diffusion_coeff(t),
    "ve_perturb": lambda x, t: ve_perturb(x, t, noise=torch.ones_like(x)),
    "ve_sde_em_step": lambda x, t: ve_sde_em_step(x, x, t, DT, noise=torch.ones_like(x)),
    "ve_ode_step": lambda x, t: ve_ode_step(x, x, t, DT),
}


@pytest.mark.parametrize("form", ["float", "0d", "batch", "0d-float32"])
@pytest.mark.parametrize("bad", [-0.1, -1e-30, -math.inf, math.inf, math.nan])
@pytest.mark.parametrize("name", list(T_OPS))
def test_time_must_be_finite_and_nonnegative(name, bad, form):
    # t < 0 was never checked: ve_perturb(x, -0.1, noise=z) was all NaN, ve_marginal_std(-0.1) NaN.
    x = _x(4, 3)
    t = {
        "float": bad,
        "0d": torch.tensor(bad, dtype=torch.float64),
        "batch": torch.tensor([0.5, 0.2, bad, 0.1], dtype=torch.float64),
        "0d-float32": torch.tensor(bad, dtype=torch.float32),
    }[form]
    where = r" at flat index 2" if form == "batch" else r"$"
    pattern = rf"mmer_ext\.{name}: t must be finite and >= 0 \(time runs forward from 0\), got -?(nan|inf|[0-9.e-]+)"
    with pytest.raises(RuntimeError, match=pattern + where):
        T_OPS[name](x, t)


@pytest.mark.parametrize("name", list(T_OPS))
def test_time_zero_is_accepted(name):
    out = T_OPS[name](_x(4, 3), torch.zeros(4, dtype=torch.float64))
    out = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_alpha_bar_outside_unit_interval(bad):
    x = _x(4, 3)
    with pytest.raises(RuntimeError, match=r"ddim_step: alpha_bar_t must be in \(0, 1\]"):
        ddim_step(x, x, bad, 0.5)
    with pytest.raises(RuntimeError, match=r"ddim_step: alpha_bar_prev must be in \(0, 1\]"):
        ddim_step(x, x, 0.5, torch.tensor([0.5, 0.6, bad, 0.7]))
    with pytest.raises(RuntimeError, match=r"ddim_step: alpha_bar_t must be in \(0, 1\]"):
        ddim_step(x, x, torch.tensor(bad), 0.5)


def test_negative_snr_and_eta():
    x = _x(4, 3)
    with pytest.raises(RuntimeError, match=r"langevin_corrector_step: snr must be finite and >= 0, got -0.1"):
        langevin_corrector_step(x, x, -0.1)
    with pytest.raises(RuntimeError, match=r"ddim_step: eta must be finite and >= 0"):
        ddim_step(x, x, 0.5, 0.6, -1.0)


@pytest.mark.parametrize("sigma", [1.0, 0.0, -2.0, float("inf")])
def test_bad_sigma(sigma):
    x = _x(4, 3)
    with pytest.raises(RuntimeError, match=r"ve_perturb: sigma must be positive, finite and != 1"):
        ve_perturb(x, 0.5, sigma)
    with pytest.raises(RuntimeError, match=r"ve_marginal_std: sigma must be positive, finite and != 1"):
        ve_marginal_std(0.5, sigma)


def test_state_needs_batch_dimension():
    x = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match=r"ve_perturb: x must be \[B, \.\.\.\] with a batch dimension first"):
        ve_perturb(x, 0.5)


def test_generator_of_wrong_device_type():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA generator")
    with pytest.raises(RuntimeError, match=r"ve_perturb: generator is a cuda(:0)? generator but x is on cpu"):
        ve_perturb(_x(4, 3), 0.5, generator=torch.Generator(device="cuda"))
