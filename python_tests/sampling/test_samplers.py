"""The functional samplers of mmer_ext.sampling: exact maths against hand-written loops, statistics on an analytic
score, conditioning, determinism, edge cases and argument errors."""

from __future__ import annotations

import math

import pytest
import torch

from mmer_ext.sampling import (
    SAMPLERS,
    sample,
    sample_ddim,
    sample_em,
    sample_ode,
    sample_ode_heun,
    sample_pc,
    ve_timesteps,
)
from sampling_problems import (  # noqa: E402
    K,
    S,
    exact_prior,
    gaussian_score,
    make_problem,
    marginal_std,
    standardized_moments,
)

SIGMA = 25.0
NAMES = ["em", "pc", "ode", "ode-heun", "ddim"]


class RecordingNoise:
    """A noise_sampler that draws standard normals from its own generator and remembers them in order."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.draws: list[torch.Tensor] = []

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        z = torch.randn(like.shape, generator=self.generator, dtype=like.dtype)
        self.draws.append(z)
        return z


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.dim() - 1)))


# ---------------------------------------------------------------------------------------------------------------------
# hand-written loops (independent of mmer_ext: IMDer's formulas written out in plain torch)


def imder_em_loop(score_fn, cond, noises, steps, eps=1e-3, sigma=SIGMA):
    """IMDer's Euler_Maruyama_sampler, verbatim in structure: std via (sigma**(2t) - 1) / 2 / log(sigma)."""
    it = iter(noises)
    B = cond.shape[0]
    ts = torch.linspace(1.0, eps, steps, dtype=cond.dtype)
    dt = ts[0] - ts[1]
    std = lambda t: torch.sqrt((sigma ** (2 * t) - 1.0) / 2.0 / math.log(sigma))  # noqa: E731
    x = next(it) * _col(std(torch.ones(B, dtype=cond.dtype)), cond)
    mean = x
    for t in ts:
        bt = torch.ones(B, dtype=cond.dtype) * t
        y = cond + next(it) * _col(std(bt), cond)
        g = sigma**bt
        mean = x + _col(g**2, x) * score_fn(x, bt, y) * dt
        x = mean + torch.sqrt(dt) * _col(g, x) * next(it)
    assert next(it, None) is None, "the sampler drew more noise than IMDer's loop uses"
    return mean


def std_of(t, sigma=SIGMA):
    return math.sqrt((sigma ** (2 * t) - 1.0) / 2.0 / math.log(sigma))


def pc_loop(score_fn, cond, noises, steps, snr, corrector_steps, eps=1e-3, sigma=SIGMA):
    it = iter(noises)
    B = cond.shape[0]
    ts = torch.linspace(1.0, eps, steps, dtype=cond.dtype)
    dt = float(ts[0] - ts[1])
    x = next(it) * std_of(1.0)
    mean = x
    for t in ts.tolist():
        bt = torch.full((B,), t, dtype=cond.dtype)
        for _ in range(corrector_steps):
            s = score_fn(x, bt, cond + next(it) * std_of(t))
            z = next(it)
            ratio = snr * z.reshape(B, -1).norm(dim=1) / s.reshape(B, -1).norm(dim=1)
            step = _col(2 * ratio**2, x)
            x = x + step * s + torch.sqrt(2 * step) * z
        s = score_fn(x, bt, cond + next(it) * std_of(t))
        g = sigma**t
        mean = x + g * g * s * dt
        x = mean + math.sqrt(dt) * g * next(it)
    return mean


def ode_loop(score_fn, cond, noises, steps, heun, eps=1e-3, sigma=SIGMA):
    it = iter(noises)
    B = cond.shape[0]
    ts = torch.linspace(1.0, eps, steps, dtype=cond.dtype).tolist()
    dt = ts[0] - ts[1] if steps > 1 else 1.0 - eps
    x = next(it) * std_of(1.0)
    for i, t in enumerate(ts):
        d1 = -0.5 * sigma ** (2 * t) * score_fn(x, torch.full((B,), t, dtype=cond.dtype),
                                                 cond + next(it) * std_of(t))
        if not heun or i == steps - 1:
            x = x - d1 * dt
            continue
        t2 = ts[i + 1]
        x_e = x - d1 * dt
        d2 = -0.5 * sigma ** (2 * t2) * score_fn(x_e, torch.full((B,), t2, dtype=cond.dtype),
                                                  cond + next(it) * std_of(t2))
        x = x - 0.5 * (d1 + d2) * dt
    return x


def ddim_euler_sigma_loop(score_fn, cond, noises, steps, eps=1e-3):
    """DDIM with eta = 0 for a VE model written as the Euler step in std (Karras et al. 2022), no VP detour."""
    it = iter(noises)
    B = cond.shape[0]
    ts = torch.linspace(1.0, eps, steps, dtype=cond.dtype).tolist()
    stds = [std_of(t) for t in ts] + [0.0]
    x = next(it) * stds[0]
    for i, t in enumerate(ts):
        s = score_fn(x, torch.full((B,), t, dtype=cond.dtype), cond + next(it) * stds[i])
        x0 = x + stds[i] ** 2 * s
        x = x0 + stds[i + 1] / stds[i] * (x - x0)
    return x


def _small_problem(dtype=torch.float64, batch=6):
    return make_problem(batch, (3, 5), seed=3, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------------
# exact maths


@pytest.mark.parametrize("steps", [1, 2, 100])
def test_em_matches_imder_loop(steps):
    _, cond = _small_problem()
    noise = RecordingNoise()
    ours = sample_em(gaussian_score, cond, steps=steps, noise_sampler=noise)
    ref = imder_em_loop(gaussian_score, cond, noise.draws, steps) if steps > 1 else None
    if steps == 1:
        # IMDer's loop needs two grid times for dt; ours takes dt = 1 - eps.
        it = iter(noise.draws)
        x = next(it) * std_of(1.0)
        bt = torch.ones(cond.shape[0], dtype=cond.dtype)
        ref = x + SIGMA**2 * gaussian_score(x, bt, cond + next(it) * std_of(1.0)) * (1 - 1e-3)
    # draws: start, then (condition, step) per step
    assert len(noise.draws) == 1 + 2 * steps
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_em_matches_imder_loop_float32():
    _, cond = _small_problem(torch.float32)
    noise = RecordingNoise(1)
    ours = sample_em(gaussian_score, cond, steps=100, noise_sampler=noise)
    torch.testing.assert_close(ours, imder_em_loop(gaussian_score, cond, noise.draws, 100), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("corrector_steps", [0, 1, 2])
def test_pc_matches_hand_loop(corrector_steps):
    _, cond = _small_problem()
    noise = RecordingNoise(2)
    ours = sample_pc(gaussian_score, cond, steps=7, snr=0.16, corrector_steps=corrector_steps, noise_sampler=noise)
    assert len(noise.draws) == 1 + 7 * (2 * corrector_steps + 2)
    ref = pc_loop(gaussian_score, cond, noise.draws, 7, 0.16, corrector_steps)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_pc_without_corrector_is_em():
    _, cond = _small_problem()
    a = sample_pc(gaussian_score, cond, steps=9, corrector_steps=0, generator=torch.Generator().manual_seed(5))
    b = sample_em(gaussian_score, cond, steps=9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("heun", [False, True])
@pytest.mark.parametrize("steps", [1, 2, 9])
def test_ode_matches_hand_loop(heun, steps):
    _, cond = _small_problem()
    noise = RecordingNoise(3)
    ours = sample_ode(gaussian_score, cond, steps=steps, method="heun" if heun else "euler", noise_sampler=noise)
    evaluations = 2 * steps - 1 if heun else steps
    assert len(noise.draws) == 1 + evaluations
    torch.testing.assert_close(ours, ode_loop(gaussian_score, cond, noise.draws, steps, heun), rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize("steps", [1, 2, 12])
def test_ddim_eta0_is_euler_in_std(steps):
    _, cond = _small_problem()
    noise = RecordingNoise(4)
    ours = sample_ddim(gaussian_score, cond, steps=steps, noise_sampler=noise)
    assert len(noise.draws) == 1 + steps  # eta = 0 draws no step noise
    torch.testing.assert_close(ours, ddim_euler_sigma_loop(gaussian_score, cond, noise.draws, steps), rtol=1e-9,
                               atol=1e-9)


def test_ddim_eta_draws_step_noise_and_last_step_is_x0():
    _, cond = _small_problem()
    noise = RecordingNoise(5)
    out = sample_ddim(gaussian_score, cond, steps=6, eta=1.0, noise_sampler=noise)
    assert len(noise.draws) == 1 + 2 * 6
    # The last step lands on std = 0: its noise has no effect (s = 0 there).
    noise2 = RecordingNoise(5)
    calls = {"n": 0}

    def altered(like):
        calls["n"] += 1
        z = noise2(like)
        return z * 100 if calls["n"] == 13 else z

    assert torch.equal(sample_ddim(gaussian_score, cond, steps=6, eta=1.0, noise_sampler=altered), out)


def test_heun_second_evaluation_sees_next_time_and_own_condition_noise():
    _, cond = _small_problem()
    seen = []

    def spy(x, t, c):
        seen.append((t.clone(), c.clone()))
        return gaussian_score(x, t, c)

    steps = 4
    sample_ode_heun(spy, cond, steps=steps, generator=torch.Generator().manual_seed(0))
    ts = ve_timesteps(steps, dtype=torch.float64)
    expected_times = [ts[0]] + [ts[i] for i in range(1, steps) for _ in range(2)]
    assert len(seen) == 2 * steps - 1
    for (t, _), want in zip(seen, expected_times):
        assert torch.equal(t, want.expand_as(t))
    # every evaluation re-noises the condition, including two at the same time
    assert not torch.equal(seen[1][1], seen[2][1])


# ---------------------------------------------------------------------------------------------------------------------
# conditioning, time and randomness plumbing


def test_condition_is_renoised_per_evaluation_with_std_t():
    mu, cond = make_problem(64, (4, 16))
    seen = []

    def spy(x, t, c):
        seen.append((t.clone(), c.clone()))
        return gaussian_score(x, t, c)

    sample_em(spy, cond, steps=10, generator=torch.Generator().manual_seed(0))
    ts = ve_timesteps(10)
    assert len(seen) == 10
    zs = []
    for i, (t, c) in enumerate(seen):
        assert t.shape == (64,) and t.dtype == torch.float32
        assert torch.equal(t, ts[i].expand(64))
        z = ((c.double() - cond.double()) / marginal_std(ts[i])).flatten()
        assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05
        zs.append(z)
    # fresh noise each step: consecutive draws are uncorrelated
    assert abs(float(torch.corrcoef(torch.stack(zs[:2]))[0, 1])) < 0.05


def test_same_seed_same_result_and_generator_advances(device):
    _, cond = make_problem(8, (3, 5), device=device)
    for name in NAMES:
        kw = {"eta": 0.5} if name == "ddim" else {}
        g1 = torch.Generator(device).manual_seed(7)
        g2 = torch.Generator(device).manual_seed(7)
        a = sample(name, gaussian_score, cond, steps=5, generator=g1, **kw)
        b = sample(name, gaussian_score, cond, steps=5, generator=g2, **kw)
        assert torch.equal(a, b), name
        assert torch.equal(g1.get_state(), g2.get_state())
        c = sample(name, gaussian_score, cond, steps=5, generator=g1, **kw)
        assert not torch.equal(a, c), name
        d = sample(name, gaussian_score, cond, steps=5, generator=torch.Generator(device).manual_seed(8), **kw)
        assert not torch.equal(a, d), name


def test_default_generator_is_used_without_generator():
    _, cond = _small_problem()
    torch.manual_seed(11)
    a = sample_em(gaussian_score, cond, steps=3)
    torch.manual_seed(11)
    b = sample_em(gaussian_score, cond, steps=3)
    assert torch.equal(a, b)


def test_x_init_is_the_start_and_not_modified():
    mu, cond = _small_problem()
    x_init = torch.randn(cond.shape, dtype=cond.dtype, generator=torch.Generator().manual_seed(0))
    keep = x_init.clone()
    noise = RecordingNoise(0)
    out = sample_ode(gaussian_score, cond, steps=3, x_init=x_init, noise_sampler=noise)
    assert torch.equal(x_init, keep)
    assert len(noise.draws) == 3  # no start draw
    ref = ode_loop(gaussian_score, cond, [x_init / std_of(1.0)] + noise.draws, 3, heun=False)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_start_distribution_is_imder_prior():
    _, cond = make_problem(64, (4, 16))
    starts = []

    def spy(x, t, c):
        if not starts:
            starts.append(x.clone())
        return gaussian_score(x, t, c)

    sample_em(spy, cond, steps=1, generator=torch.Generator().manual_seed(0))
    x = starts[0].double()
    assert abs(float(x.mean())) < 0.05 * std_of(1.0)
    assert abs(float(x.std()) / std_of(1.0) - 1) < 0.03


# ---------------------------------------------------------------------------------------------------------------------
# statistics on the analytic problem

# (sampler, steps, options, tolerance): enough steps for each to reach the target moments from the exact prior.
CONVERGED = [
    ("em", 100, {}, 0.05),
    ("pc", 100, {}, 0.05),
    ("ode", 400, {"schedule": "linear"}, 0.05),
    ("ode-heun", 50, {"schedule": "linear"}, 0.04),
    ("ddim", 200, {"schedule": "karras"}, 0.04),
]


@pytest.mark.parametrize("name, steps, options, tol", CONVERGED, ids=[c[0] for c in CONVERGED])
def test_samples_have_target_moments(name, steps, options, tol):
    # n = 8192 elements: the standard error of the mean and of the std of z are ~0.011 and ~0.008.
    mu, cond = make_problem(128, (4, 16))
    g = torch.Generator().manual_seed(0)
    x = sample(name, gaussian_score, cond, steps=steps, generator=g, x_init=exact_prior(mu, g), **options)
    m, s = standardized_moments(x, mu)
    assert abs(m) < tol and abs(s - 1) < tol, (m, s)


def test_sde_forgets_imder_prior_mismatch_but_ode_keeps_it():
    # IMDer starts at N(0, std(1)^2) instead of N(mu, s^2 + std(1)^2). The probability-flow map contracts the start's
    # offset by s / sqrt(s^2 + std(1)^2) only, so the ODE keeps a mean error of -E[mu] / sqrt(s^2 + std(1)^2) in z;
    # the SDE contracts by the variance ratio and forgets it.
    mu, cond = make_problem(128, (4, 16))
    em = sample_em(gaussian_score, cond, steps=100, generator=torch.Generator().manual_seed(0))
    heun = sample_ode_heun(gaussian_score, cond, steps=50, schedule="linear",
                           generator=torch.Generator().manual_seed(0))
    predicted = -float(mu.double().mean()) / math.sqrt(S**2 + std_of(1.0) ** 2)
    assert abs(standardized_moments(em, mu)[0]) < 0.04
    assert abs(standardized_moments(heun, mu)[0] - predicted) < 0.03
    assert predicted < -0.08


def test_few_step_deterministic_samplers_beat_few_step_em():
    mu, cond = make_problem(128, (4, 16))
    err = {}
    for name in ("em", "ode-heun", "ddim"):
        g = torch.Generator().manual_seed(0)
        x = sample(name, gaussian_score, cond, steps=10, generator=g, x_init=exact_prior(mu, g))
        err[name] = abs(standardized_moments(x, mu)[1] - 1)
    # measured: em 0.33, ode-heun 0.16, ddim 0.25 (the spread of the samples is what few steps get wrong)
    assert err["ode-heun"] < err["em"] - 0.1
    assert err["ddim"] < err["em"] - 0.05


def test_linear_schedule_removes_imder_last_step_overshoot():
    mu, cond = make_problem(128, (4, 16))
    err = {}
    for schedule in ("imder", "linear"):
        g = torch.Generator().manual_seed(0)
        x = sample_ode_heun(gaussian_score, cond, steps=20, schedule=schedule, generator=g, x_init=exact_prior(mu, g))
        err[schedule] = abs(standardized_moments(x, mu)[1] - 1)
    # imder's last step from eps to eps - dt shrinks the spread by ~dt / (2 s^2) = 0.1 (measured 0.09)
    assert err["imder"] > 0.06
    assert err["linear"] < 0.03


def test_conditioning_matters():
    # The same sampler with the condition of other samples recovers their means, not these.
    mu, cond = make_problem(32, (4, 16))
    g = torch.Generator().manual_seed(0)
    x = sample_ddim(gaussian_score, cond.roll(1, 0), steps=50, schedule="karras", generator=g)
    m, s = standardized_moments(x, mu)
    assert s > 1.3  # the row-to-row variation of mu now shows up as error


# ---------------------------------------------------------------------------------------------------------------------
# time grids


def test_ve_timesteps_grids():
    ts = ve_timesteps(100)
    assert ts.shape == (100,) and ts.dtype == torch.float32
    assert torch.equal(ts, torch.linspace(1.0, 1e-3, 100))
    assert torch.equal(ve_timesteps(1), torch.tensor([1.0]))
    k = ve_timesteps(10, schedule="karras", dtype=torch.float64)
    assert k[0] == 1.0 and k[-1] == 1e-3 and bool((k[1:] < k[:-1]).all())
    stds = marginal_std(k)
    # equally spaced in std^(1/7)
    root = stds ** (1 / 7)
    torch.testing.assert_close(root.diff(), root.diff()[:1].expand(9), rtol=1e-6, atol=1e-9)
    assert torch.equal(ve_timesteps(5, schedule="linear"), ve_timesteps(5))


@pytest.mark.parametrize("schedule", ["imder", "linear", "karras"])
def test_step_sizes_per_schedule(schedule):
    from mmer_ext.sampling import _core

    plan = _core.make_plan("ode", 3, torch.device("cpu"), torch.float64, steps=7, sigma=SIGMA, eps=1e-3,
                            schedule=schedule)
    ts = plan.ts.tolist()
    if schedule == "imder":
        # one dt for all steps, the last ends at eps - dt < 0
        assert set(plan.dts) == {ts[0] - ts[1]}
    else:
        # grid time to grid time, then eps to 0: the steps add up to 1
        assert plan.dts[:-1] == tuple(a - b for a, b in zip(ts, ts[1:])) and plan.dts[-1] == ts[-1]
        assert math.isclose(sum(plan.dts), 1.0, rel_tol=1e-12)
    assert plan.t_batch.shape == (7, 3) and plan.t_batch.is_contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# edge cases


@pytest.mark.parametrize("name", NAMES)
def test_one_step_works(name):
    _, cond = _small_problem(torch.float32)
    out = sample(name, gaussian_score, cond, steps=1, generator=torch.Generator().manual_seed(0))
    assert out.shape == cond.shape and out.dtype == cond.dtype and bool(out.isfinite().all())


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch_returns_empty_without_calling_score(name):
    cond = torch.empty(0, 3, 5)

    def never(x, t, c):
        raise AssertionError("score_fn called on an empty batch")

    out = sample(name, never, cond, steps=3)
    assert out.shape == (0, 3, 5) and out.dtype == cond.dtype


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_and_shapes(name, dtype):
    _, cond = make_problem(4, (2, 3, 5), dtype=dtype)
    out = sample(name, gaussian_score, cond, steps=4, generator=torch.Generator().manual_seed(0))
    assert out.shape == cond.shape and out.dtype == dtype and not out.requires_grad


def test_no_grad_by_default_and_grad_option():
    _, cond = _small_problem(torch.float32)
    shift = torch.zeros((), requires_grad=True)

    def shifted(x, t, c):
        return gaussian_score(x, t, c) + shift

    out = sample_em(shifted, cond, steps=3, generator=torch.Generator().manual_seed(0))
    assert not out.requires_grad
    out = sample_em(shifted, cond, steps=3, generator=torch.Generator().manual_seed(0), grad=True)
    assert out.requires_grad
    out.sum().backward()
    assert shift.grad is not None and shift.grad > 0


def test_samplers_table_and_dispatch():
    assert set(SAMPLERS) == {"em", "pc", "ode", "ode-heun", "ddim"}
    _, cond = _small_problem()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(sample("ode-heun", gaussian_score, cond, steps=4, generator=g()),
                       sample_ode(gaussian_score, cond, steps=4, method="heun", generator=g()))
    assert torch.equal(sample("ode", gaussian_score, cond, steps=4, generator=g()),
                       sample_ode(gaussian_score, cond, steps=4, generator=g()))


# ---------------------------------------------------------------------------------------------------------------------
# errors


def test_unknown_sampler_name():
    with pytest.raises(ValueError, match="unknown sampler 'rk4'.*ddim"):
        sample("rk4", gaussian_score, torch.zeros(2, 3))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"steps": 0}, ValueError, "steps must be >= 1"),
        ({"steps": -3}, ValueError, "steps must be >= 1"),
        ({"steps": 2.5}, TypeError, "steps must be an int"),
        ({"steps": True}, TypeError, "steps must be an int"),
        ({"sigma": 1.0}, ValueError, "sigma"),
        ({"sigma": float("nan")}, ValueError, "sigma"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"eps": 1.0}, ValueError, "eps"),
        ({"schedule": "cosine"}, ValueError, "schedule"),
        ({"generator": torch.Generator(), "noise_sampler": lambda z: z}, ValueError, "either generator or noise"),
        ({"generator": "seed"}, TypeError, "generator"),
        ({"x_init": torch.zeros(2, 4)}, ValueError, "x_init must match cond"),
        ({"x_init": torch.zeros(2, 3, dtype=torch.float64)}, ValueError, "x_init must match cond"),
        ({"noise_sampler": 3}, TypeError, "noise_sampler must be callable"),
    ],
)
def test_bad_common_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sample_em(gaussian_score, torch.zeros(2, 3), **kwargs)


@pytest.mark.parametrize(
    "fn, kwargs, exc, match",
    [
        (sample_pc, {"snr": 0.0}, ValueError, "snr"),
        (sample_pc, {"corrector_steps": -1}, ValueError, "corrector_steps"),
        (sample_ode, {"method": "rk4"}, ValueError, "method must be 'euler' or 'heun'"),
        (sample_ode_heun, {"method": "euler"}, TypeError, "fixes method='heun'"),
        (sample_ddim, {"eta": -0.1}, ValueError, "eta"),
        (sample_ddim, {"eta": 1.5}, ValueError, "eta"),
    ],
)
def test_bad_sampler_arguments(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(gaussian_score, torch.zeros(2, 3), **kwargs)


def test_bad_cond_and_score_fn():
    with pytest.raises(TypeError, match="cond must be a torch.Tensor"):
        sample_em(gaussian_score, [[0.0]])
    with pytest.raises(ValueError, match="cond must be a floating-point tensor"):
        sample_em(gaussian_score, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="cond must be a floating-point tensor"):
        sample_em(gaussian_score, torch.tensor(1.0))
    with pytest.raises(TypeError, match="score_fn must be callable"):
        sample_em(None, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"score_fn must return a tensor shaped like x \(2, 3\), got \(2,\)"):
        sample_em(lambda x, t, c: x.sum(1), torch.zeros(2, 3), steps=2)
    with pytest.raises(ValueError, match="noise_sampler must return a tensor of shape"):
        sample_em(gaussian_score, torch.zeros(2, 3), noise_sampler=lambda like: torch.zeros(1))


def test_gaussian_score_reads_condition():
    # sanity of the test problem: with the clean condition the score points at mu
    mu, cond = make_problem(4, (3,), dtype=torch.float64)
    t = torch.full((4,), 0.5, dtype=torch.float64)
    s = gaussian_score(mu + 1.0, t, cond)
    torch.testing.assert_close(s, torch.full_like(s, -1.0) / (S**2 + marginal_std(t[:1]) ** 2))
    assert K == 1000.0
