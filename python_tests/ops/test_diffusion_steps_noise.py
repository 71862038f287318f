"""In-kernel noise of the sampling-step ops (``generator=`` / default generator) and their CUDA-only behaviour.

The noise an op drew is read back from its outputs (e.g. ``(x_next - x_mean) / (sqrt(dt) g(t))`` for the
Euler-Maruyama step) and tested for N(0, 1) statistics, independence between elements, and reproducibility.
CUDA tests (device parity, float16/bfloat16, CUDA-graph capture) are skipped without a GPU.
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
from op_testing import cuda_only  # noqa: E402  (this folder, put on sys.path by pytest)

SIGMA = 25.0
DT = 0.01
SNR = 0.16
NOISY_OPS = ["ve_perturb", "ve_sde_em_step", "langevin_corrector_step", "ddim_step"]
def _randn(shape, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def drawn_noise(name: str, x, s, **kw) -> torch.Tensor:
    """The standard normal noise the op drew, recovered from its outputs (float64)."""
    if name == "ve_perturb":
        out = ve_perturb(x, 0.8, SIGMA, **kw)
        return (out.double() - x.double()) / float(ve_marginal_std(torch.tensor(0.8, dtype=torch.float64)))
    if name == "ve_sde_em_step":
        nxt, mean = ve_sde_em_step(x, s, 0.6, DT, SIGMA, **kw)
        return (nxt.double() - mean.double()) / (math.sqrt(DT) * SIGMA**0.6)
    if name == "langevin_corrector_step":
        nxt, mean = langevin_corrector_step(x, s, SNR, **kw)
        B, per_sample = x.shape[0], math.prod(x.shape[1:])
        s64 = s.double().reshape(B, per_sample)
        drift = (mean.double() - x.double()).reshape(B, per_sample)
        eps = (drift * s64).sum(1, keepdim=True) / (s64 * s64).sum(1, keepdim=True)
        return ((nxt.double() - mean.double()).reshape(B, per_sample) / torch.sqrt(2 * eps)).reshape(x.shape)
    if name == "ddim_step":
        nxt, x0 = ddim_step(x, s, 0.3, 0.6, 1.0, **kw)
        _, a, d, std = (float(c) for c in ref.ddim_coefficients_ref(torch.tensor(0.3), torch.tensor(0.6), 1.0)[1:])
        return (nxt.double() - (a * x0.double() + d * s.double())) / std
    raise ValueError(name)


def _check_standard_normal(z: torch.Tensor) -> None:
    z = z.reshape(-1).cpu()
    n = z.numel()
    assert torch.isfinite(z).all()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 6 * math.sqrt(2 / n)
    # Tails: P(|z| > 2) = 0.0455, P(|z| > 3) = 0.0027 (binomial tolerance, 5 sigma).
    for k, p in ((2.0, 0.04550026), (3.0, 0.00269980)):
        frac = float((z.abs() > k).double().mean())
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n), (k, frac)
    from scipy import stats

    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4


def _max_lag_correlation(z: torch.Tensor, lags) -> float:
    z = z.reshape(-1).cpu()
    z = (z - z.mean()) / z.std()
    return max(abs(float((z[:-lag] * z[lag:]).mean())) for lag in lags)


# ---- statistics ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NOISY_OPS)
def test_in_kernel_noise_is_standard_normal(name, device):
    # 2^18 + 3 elements per call, over samples whose size is not a multiple of 4.
    x = _randn((13, 20165), device)
    s = _randn((13, 20165), device, seed=1)
    gen = torch.Generator(device=device).manual_seed(1234)
    z = drawn_noise(name, x, s, generator=gen)
    _check_standard_normal(z)


@pytest.mark.parametrize("name", NOISY_OPS)
def test_in_kernel_noise_is_uncorrelated(name, device):
    x = _randn((8, 32768), device, dtype=torch.float64)
    s = _randn((8, 32768), device, dtype=torch.float64, seed=1)
    z = drawn_noise(name, x, s, generator=torch.Generator(device=device).manual_seed(7))
    n = z.numel()
    # Lags 1-3 stay inside a Philox block (1: the two outputs of one Box-Muller pair), 4-8 cross blocks, 32768
    # compares the same position in consecutive samples.
    assert _max_lag_correlation(z, [1, 2, 3, 4, 5, 7, 8, 32768]) < 5 / math.sqrt(n)


def test_consecutive_calls_are_independent(device):
    x = torch.zeros(4, 65536, device=device)
    gen = torch.Generator(device=device).manual_seed(3)
    a = ve_perturb(x, 1.0, generator=gen).reshape(-1).cpu()
    b = ve_perturb(x, 1.0, generator=gen).reshape(-1).cpu()
    assert not torch.equal(a, b)
    corr = float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))
    assert abs(corr) < 5 / math.sqrt(a.numel())


# ---- reproducibility ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NOISY_OPS)
def test_same_seed_gives_bitwise_identical_results(name, device):
    x = _randn((5, 3, 7), device)
    s = _randn((5, 3, 7), device, seed=1)
    gen = torch.Generator(device=device)
    gen.manual_seed(42)
    a = drawn_noise(name, x, s, generator=gen)
    b = drawn_noise(name, x, s, generator=gen)  # the generator advanced: different noise
    gen.manual_seed(42)
    c = drawn_noise(name, x, s, generator=gen)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", NOISY_OPS)
def test_default_generator_follows_manual_seed(name, device):
    x = _randn((3, 50), device)
    s = _randn((3, 50), device, seed=1)
    torch.manual_seed(5)
    a = drawn_noise(name, x, s)
    b = drawn_noise(name, x, s)
    torch.manual_seed(5)
    c = drawn_noise(name, x, s)
    assert torch.equal(a, c) and not torch.equal(a, b)


def test_noise_depends_on_element_index_only(device):
    # The noise of element i is a function of (seed, offset, i): independent of the batch layout and the op.
    gen = torch.Generator(device=device)
    x = torch.zeros(6, 35, device=device, dtype=torch.float64)
    gen.manual_seed(9)
    a = drawn_noise("ve_perturb", x, x, generator=gen)
    gen.manual_seed(9)
    b = drawn_noise("ve_perturb", x.reshape(3, 70), x.reshape(3, 70), generator=gen)
    gen.manual_seed(9)
    c = drawn_noise("ve_sde_em_step", x, x, generator=gen)
    torch.testing.assert_close(a.reshape(-1), b.reshape(-1), rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_noise_is_the_same_for_every_dtype(device):
    # Box-Muller runs in float32 for every dtype: a float64 call gets the float32 normals, converted exactly.
    gen = torch.Generator(device=device)
    out = {}
    for dtype in (torch.float32, torch.float64):
        gen.manual_seed(4)
        out[dtype] = ve_perturb(torch.zeros(3, 37, device=device, dtype=dtype), 1.0, generator=gen)
    torch.testing.assert_close(out[torch.float64].float(), out[torch.float32], rtol=2e-7, atol=0)


@pytest.mark.parametrize("name", NOISY_OPS)
def test_thread_count_does_not_change_bits(name):
    x = _randn((7, 40001), "cpu")
    s = _randn((7, 40001), "cpu", seed=1)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(drawn_noise(name, x, s, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(results[0], results[1])


def test_langevin_passes_see_the_same_noise(device):
    # The step size comes from ||z_b|| in the first pass, the update adds sqrt(2 eps_b) z_b in the second: with the
    # same z, ||x_next - x_mean||_b = eps_b ||score_b|| / snr exactly (up to rounding).
    x = _randn((6, 3, 1001), device, dtype=torch.float64)
    s = _randn((6, 3, 1001), device, dtype=torch.float64, seed=1)
    nxt, mean = langevin_corrector_step(x, s, SNR, generator=torch.Generator(device=device).manual_seed(2))
    s_flat = s.reshape(6, -1)
    eps = ((mean - x).reshape(6, -1) * s_flat).sum(1) / (s_flat * s_flat).sum(1)
    torch.testing.assert_close((nxt - mean).reshape(6, -1).norm(dim=1), eps * s_flat.norm(dim=1) / SNR)


def test_empty_batch_with_generator(device):
    x = torch.empty(0, 4, device=device)
    for name in NOISY_OPS:
        out = drawn_noise(name, x, x, generator=torch.Generator(device=device).manual_seed(0))
        assert out.shape == x.shape


# ---- CUDA ---------------------------------------------------------------------------------------------------------

STEP_CALLS = {
    "ve_perturb": lambda x, s, t, **k: ve_perturb(x, t, SIGMA, **k),
    "ve_sde_em_step": lambda x, s, t, **k: ve_sde_em_step(x, s, t, DT, SIGMA, **k),
    "ve_ode_step": lambda x, s, t, **k: ve_ode_step(x, s, t, DT, SIGMA),
    "langevin_corrector_step": lambda x, s, t, **k: langevin_corrector_step(x, s, SNR, **k),
    "ddim_step": lambda x, s, t, **k: ddim_step(x, s, t, (t + 1) / 2, 0.8, **k),
}
REF_CALLS = {
    "ve_perturb": lambda x, s, t, z: ref.ve_perturb_ref(x, t, SIGMA, noise=z),
    "ve_sde_em_step": lambda x, s, t, z: ref.ve_sde_em_step_ref(x, s, t, DT, SIGMA, noise=z),
    "ve_ode_step": lambda x, s, t, z: ref.ve_ode_step_ref(x, s, t, DT, SIGMA),
    "langevin_corrector_step": lambda x, s, t, z: ref.langevin_corrector_step_ref(x, s, SNR, noise=z),
    "ddim_step": lambda x, s, t, z: ref.ddim_step_ref(x, s, t, (t + 1) / 2, 0.8, noise=z),
}


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _t_values(batch, device, dtype=torch.float64):
    return (0.05 + 0.9 * torch.rand(batch, generator=torch.Generator().manual_seed(4), dtype=torch.float64)).to(
        device=device, dtype=dtype
    )


@pytest.mark.parametrize("param", ["float", "0d_cpu", "0d_cuda", "batch"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (4, 32, 48), (2, 3, 7), (64, 65537)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(STEP_CALLS))
@cuda_only
def test_cuda_matches_cpu(name, dtype, shape, param):
    x, s, z = (_randn(shape, "cpu", dtype, seed=k) for k in range(3))
    tb = _t_values(shape[0], "cpu")
    t_cpu = {"float": 0.4, "0d_cpu": torch.tensor(0.4), "0d_cuda": torch.tensor(0.4), "batch": tb}[param]
    t_gpu = {"float": 0.4, "0d_cpu": torch.tensor(0.4), "0d_cuda": torch.tensor(0.4, device="cuda"),
             "batch": tb.cuda()}[param]
    expected = _as_tuple(STEP_CALLS[name](x, s, t_cpu, noise=z) if name != "ve_ode_step" else
                         STEP_CALLS[name](x, s, t_cpu))
    kw = {} if name == "ve_ode_step" else {"noise": z.cuda()}
    got = _as_tuple(STEP_CALLS[name](x.cuda(), s.cuda(), t_gpu, **kw))
    tol = {} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}
    for a, b in zip(got, expected):
        assert a.is_cuda and a.is_contiguous()
        torch.testing.assert_close(a.cpu(), b, **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(STEP_CALLS))
@cuda_only
def test_cuda_half_precision_uses_float32_math(name, dtype):
    shape = (6, 32, 49)
    x, s, z = (_randn(shape, "cuda", dtype, seed=k) for k in range(3))
    t = _t_values(6, "cuda", torch.float32)
    kw = {} if name == "ve_ode_step" else {"noise": z}
    got = _as_tuple(STEP_CALLS[name](x, s, t, **kw))
    # Reference: the same (rounded) inputs in float32, the result rounded once to the dtype.
    expected = _as_tuple(REF_CALLS[name](x.float(), s.float(), t, z.float()))
    tol = {"rtol": 2e-3, "atol": 2e-3} if dtype == torch.float16 else {"rtol": 1.6e-2, "atol": 1e-2}
    for a, b in zip(got, expected):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.to(dtype).float(), **tol)
    # In-kernel noise in half precision is still N(0, 1) (drawn in float32).
    big = torch.zeros(8, 32768, device="cuda", dtype=dtype)
    out = ve_perturb(big, 1.0, generator=torch.Generator(device="cuda").manual_seed(0))
    zz = out.float() / float(ve_marginal_std(1.0))
    assert abs(float(zz.mean())) < 0.01 and abs(float(zz.var()) - 1) < 0.02


@cuda_only
def test_cuda_vector_and_scalar_paths_draw_the_same_noise():
    # A misaligned tensor takes the scalar path; the noise of each element must not change.
    x = _randn((5, 1003), "cuda")
    flat = torch.empty(x.numel() + 1, device="cuda")
    flat[1:] = x.reshape(-1)
    misaligned = flat[1:].view(x.shape)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(8)
    a = ve_sde_em_step(x, x, 0.5, DT, generator=gen)
    gen.manual_seed(8)
    b = ve_sde_em_step(misaligned, misaligned, 0.5, DT, generator=gen)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@cuda_only
def test_cuda_argument_devices():
    x = _randn((4, 3), "cuda")
    with pytest.raises(RuntimeError, match=r"ve_sde_em_step: t is a \[B\] tensor on cpu but x is on cuda"):
        ve_sde_em_step(x, x, torch.rand(4), DT)
    with pytest.raises(RuntimeError, match=r"ve_perturb: generator is a cpu generator but x is on cuda"):
        ve_perturb(x, 0.5, generator=torch.Generator())
    with pytest.raises(RuntimeError, match=r"ve_sde_em_step: score is on cpu but x is on cuda"):
        ve_sde_em_step(x, x.cpu(), 0.5, DT)
    with pytest.raises(RuntimeError, match=r"ve_perturb: t is a 0-d tensor on cuda(:0)? but x is on cpu"):
        ve_perturb(x.cpu(), torch.tensor(0.5, device="cuda"))


@cuda_only
def test_cuda_host_parameters_do_not_sync():
    x = _randn((4, 32, 48), "cuda")
    t_host = torch.tensor(0.3)
    ab = torch.full((4,), 0.5, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ve_perturb(x, t_host)
        ve_sde_em_step(x, x, 0.3, DT)
        ve_ode_step(x, x, torch.full((4,), 0.3, device="cuda"), DT)
        langevin_corrector_step(x, x, SNR)
        ddim_step(x, x, ab, ab, 0.5)  # device alpha_bars are not range-checked: no read-back
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _sampler_loop(x, cond, gen, ts, t_form):
    """IMDer-style EM loop with a corrector and a DDIM tail, all noise from `gen` (a toy linear score)."""
    mean = x
    for i in range(len(ts) - 1):
        t = ts[i] if t_form == "float" else torch.tensor(ts[i]) if t_form == "0d_cpu" else torch.full(
            (x.shape[0],), ts[i], device=x.device
        )
        dt = ts[i] - ts[i + 1]
        c = ve_perturb(cond, t, SIGMA, generator=gen)
        std = float(ve_marginal_std(ts[i]))
        score = -(x - c) / (1.0 + std * std)
        x, mean = ve_sde_em_step(x, score, t, dt, SIGMA, generator=gen)
        x, _ = langevin_corrector_step(x, score, SNR, generator=gen)
    x, x0 = ddim_step(x, -x, 0.5, 0.8, 0.5, generator=gen)
    return mean, x, x0


@pytest.mark.parametrize("t_form", ["float", "0d_cpu", "batch"])
@pytest.mark.parametrize("use_default_generator", [False, True], ids=["generator", "default"])
@cuda_only
def test_cuda_graph_replay_matches_eager_loop(use_default_generator, t_form):
    ts = torch.linspace(1.0, 1e-3, 11).tolist()
    x0 = _randn((16, 32, 48), "cuda") * float(ve_marginal_std(1.0))
    cond = _randn((16, 32, 48), "cuda", seed=1)
    gen = torch.cuda.default_generators[torch.cuda.current_device()] if use_default_generator else torch.Generator(
        device="cuda"
    )
    # Eager reference from a fixed seed.
    gen.manual_seed(1234)
    expected = _sampler_loop(x0.clone(), cond, gen, ts, t_form)
    static_x, static_cond = x0.clone(), cond.clone()
    # Warm up on a side stream (lazy module loading, allocator), as torch.cuda.graph recommends.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _sampler_loop(static_x.clone(), static_cond, gen, ts, t_form)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if not use_default_generator and hasattr(graph, "register_generator_state"):
        graph.register_generator_state(gen)
    with torch.cuda.graph(graph):
        out = _sampler_loop(static_x, static_cond, gen, ts, t_form)
    for trial in range(2):
        gen.manual_seed(1234)
        static_x.copy_(x0)
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(out, expected):
            assert torch.equal(a, b), f"replay {trial} differs from the eager loop"
    # Without re-seeding, a replay draws fresh noise.
    static_x.copy_(x0)
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(out[1], expected[1])


@cuda_only
def test_cuda_large_batch_langevin_matches_reference():
    # Few samples with many elements: several reduction blocks per sample.
    x, s, z = (_randn((3, 1 << 20), "cuda", seed=k) for k in range(3))
    got = langevin_corrector_step(x, s, SNR, noise=z)
    expected = ref.langevin_corrector_step_ref(x, s, SNR, noise=z)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@cuda_only
def test_cuda_compile_reduce_overhead():
    # Inductor's CUDA graphs around the op (noise= path, and the default generator inside the graph).
    def f(x, s, z, t):
        nxt, mean = ve_sde_em_step(x, s, t, DT, SIGMA, noise=z)
        return langevin_corrector_step(nxt * 1.0, s, SNR, noise=z)[1] + mean

    def g(x, s, t):
        return ve_sde_em_step(x, s, t, DT, SIGMA)[0]

    x, s, z = (_randn((8, 32, 48), "cuda", seed=k) for k in range(3))
    t = _t_values(8, "cuda", torch.float32)
    compiled = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    expected = f(x, s, z, t)
    for _ in range(3):
        torch.testing.assert_close(compiled(x, s, z, t), expected)
    compiled_g = torch.compile(g, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        torch.manual_seed(17)
        got = compiled_g(x, s, t).clone()
        torch.manual_seed(17)
        torch.testing.assert_close(got, g(x, s, t), rtol=0, atol=0)


def test_coefficient_ops_on_every_device(device):
    t = torch.linspace(0, 1, 5, device=device)
    torch.testing.assert_close(ve_diffusion_coeff(t), ref.ve_diffusion_coeff_ref(t))
    torch.testing.assert_close(ve_marginal_std(t), ref.ve_marginal_std_ref(t))
