"""VEScheduler (diffusers-style) against the functional samplers: the documented loop gives the same bits."""

from __future__ import annotations

import pytest
import torch

from mmer_ext.sampling import VEScheduler, VESchedulerOutput, sample, sample_with_scheduler, ve_timesteps
from sampling_problems import gaussian_score, make_problem  # noqa: E402

CASES = [
    ("em", {}),
    ("pc", {}),
    ("pc", {"corrector_steps": 2, "snr": 0.2}),
    ("ode", {}),
    ("ode-heun", {}),
    ("ddim", {}),
    ("ddim", {"eta": 0.5}),
]


def _check_equal(method, options, steps, schedule, device):
    _, cond = make_problem(5, (3, 4), device=device)
    sched = VEScheduler(method, schedule=schedule, **options)
    g1 = torch.Generator(device).manual_seed(9)
    g2 = torch.Generator(device).manual_seed(9)
    ours = sample_with_scheduler(sched, gaussian_score, cond, steps=steps, generator=g1)
    ref = sample(method, gaussian_score, cond, steps=steps, schedule=schedule, generator=g2, **options)
    assert torch.equal(ours, ref)
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize("schedule", ["imder", "karras"])
@pytest.mark.parametrize("steps", [1, 2, 7])
@pytest.mark.parametrize("method, options", CASES, ids=[f"{m}-{o}" for m, o in CASES])
def test_scheduler_loop_equals_functional_sampler(method, options, steps, schedule):
    _check_equal(method, options, steps, schedule, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("method, options", CASES, ids=[f"{m}-{o}" for m, o in CASES])
def test_scheduler_loop_equals_functional_sampler_cuda(method, options):
    _check_equal(method, options, 7, "imder", "cuda")


def test_documented_loop_by_hand():
    # the module docstring's loop, spelled out (sample_with_scheduler is this loop)
    _, cond = make_problem(4, (3, 4))
    g = torch.Generator().manual_seed(1)
    sched = VEScheduler(method="pc")
    sched.set_timesteps(6, device=cond.device)
    x = sched.init_noise(cond.shape, generator=g, device=cond.device, dtype=cond.dtype)
    out = None
    for t in sched.timesteps:
        tb = t.expand(cond.shape[0])
        for _ in range(sched.corrector_steps_at(t)):
            c = sched.scale_condition(cond, t, generator=g)
            x = sched.step_correct(gaussian_score(x, tb, c), x, generator=g).prev_sample
        c = sched.scale_condition(cond, t, generator=g)
        out = sched.step(gaussian_score(x, tb, c), t, x, generator=g)
        x = out.prev_sample
    ref = sample("pc", gaussian_score, cond, steps=6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.prev_sample_mean, ref)


def test_heun_is_a_two_call_state_machine():
    sched = VEScheduler("ode-heun")
    sched.set_timesteps(4)
    ts = ve_timesteps(4)
    assert sched.order == 2
    assert torch.equal(sched.timesteps, torch.stack([ts[0], ts[1], ts[1], ts[2], ts[2], ts[3], ts[3]]))
    # The first call of a pair returns the Euler point, the second the Heun average; the last entry is plain Euler.
    sched.set_timesteps(4, dtype=torch.float64)
    ts = ve_timesteps(4, dtype=torch.float64)
    dt = float(ts[0] - ts[1])
    x = torch.full((2, 3), 2.0, dtype=torch.float64)
    score = -torch.ones(2, 3, dtype=torch.float64) * 1e-3
    euler = lambda x, t: x + 0.5 * 25.0 ** (2 * float(t)) * score * dt  # noqa: E731
    first = sched.step(score, sched.timesteps[0], x)
    assert torch.equal(first.prev_sample, first.prev_sample_mean)
    torch.testing.assert_close(first.prev_sample, euler(x, ts[0]))
    second = sched.step(score, sched.timesteps[1], first.prev_sample)
    torch.testing.assert_close(second.prev_sample, 0.5 * (x + euler(euler(x, ts[0]), ts[1])))
    assert sched.step_index == 2
    y = second.prev_sample
    for k in range(2, 6):
        y = sched.step(score, sched.timesteps[k], y).prev_sample
    last = sched.step(score, sched.timesteps[6], y)
    torch.testing.assert_close(last.prev_sample, euler(y, ts[3]))


def test_step_outputs():
    _, cond = make_problem(3, (4,))
    x = torch.randn(cond.shape, generator=torch.Generator().manual_seed(0))
    s = gaussian_score(x, torch.ones(3), cond)
    for method in ("em", "ode", "ddim"):
        sched = VEScheduler(method)
        sched.set_timesteps(5)
        out = sched.step(s, sched.timesteps[0], x, generator=torch.Generator().manual_seed(0))
        assert isinstance(out, VESchedulerOutput)
        assert out.prev_sample.shape == x.shape
        assert (out.pred_original_sample is not None) == (method == "ddim")
        if method != "em":
            assert torch.equal(out.prev_sample, out.prev_sample_mean)
        else:
            assert not torch.equal(out.prev_sample, out.prev_sample_mean)
        sched.set_timesteps(5)
        tup = sched.step(s, sched.timesteps[0], x, generator=torch.Generator().manual_seed(0), return_dict=False)
        assert isinstance(tup, tuple) and torch.equal(tup[0], out.prev_sample)


def test_ddim_eta_mean_is_the_noise_free_part():
    # The mean of x_prev over the step noise is prev_sample_mean: average many draws of one step.
    x = torch.full((4096, 1), 3.0, dtype=torch.float64)
    s = torch.full_like(x, -0.02)
    sched = VEScheduler("ddim", eta=1.0)
    sched.set_timesteps(10, dtype=torch.float64)
    sched.step(s, sched.timesteps[0], x)  # move to step 1, where the step has noise
    out = sched.step(s, sched.timesteps[1], x, generator=torch.Generator().manual_seed(0))
    spread = (out.prev_sample - out.prev_sample_mean)
    assert abs(float(spread.mean())) < 4 * float(spread.std()) / 64
    assert float(spread.std()) > 0


def test_init_noise():
    sched = VEScheduler()
    x = sched.init_noise((256, 32), generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.get_default_dtype() and x.device.type == "cpu"
    assert abs(float(x.std()) / sched.init_noise_sigma - 1) < 0.03
    assert abs(sched.init_noise_sigma - 9.8454) < 1e-3
    x64 = sched.init_noise((3, 2), dtype=torch.float64)
    assert x64.dtype == torch.float64


def test_scheduler_errors():
    with pytest.raises(ValueError, match="unknown method 'rk4'"):
        VEScheduler("rk4")
    with pytest.raises(ValueError, match="eta"):
        VEScheduler("ddim", eta=2.0)
    with pytest.raises(ValueError, match="schedule"):
        VEScheduler(schedule="cosine")
    with pytest.raises(ValueError, match="sigma"):
        VEScheduler(sigma=0.5)
    sched = VEScheduler("em")
    x = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sched.step(x, 1.0, x)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        sched.set_timesteps(0)
    sched.set_timesteps(2)
    with pytest.raises(RuntimeError, match="corrector of method='pc'"):
        sched.step_correct(x, x)
    with pytest.raises(ValueError, match="score must be shaped like x"):
        sched.step(torch.zeros(2), sched.timesteps[0], x)
    for t in sched.timesteps:
        sched.step(x, t, x)
    with pytest.raises(RuntimeError, match="all 2 timesteps have been stepped"):
        sched.step(x, 0.0, x)


def test_sample_with_scheduler_empty_batch():
    out = sample_with_scheduler(VEScheduler(), lambda x, t, c: 1 / 0, torch.empty(0, 4), steps=3)
    assert out.shape == (0, 4)
