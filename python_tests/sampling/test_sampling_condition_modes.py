"""The samplers' condition modes (``condition_noise``): "shared" / "independent" re-noise the condition at every score
evaluation (the authors' sampler), "clean" hands the score the condition itself and draws no condition noise.

The analytic problem's score reads the condition (``sampling_problems.gaussian_score``), so a sampler that dropped or
perturbed it in clean mode would change the result."""

from __future__ import annotations

import pytest
import torch

from mmer_ext.sampling import (
    CONDITION_MODES,
    CUDAGraphSampler,
    VEScheduler,
    sample,
    sample_with_scheduler,
)
from sampling_problems import gaussian_score, make_problem  # noqa: E402

NAMES = ["em", "pc", "ode", "ode-heun", "ddim"]
STEPS = 5


def _options(name: str) -> dict:
    # DDIM with eta > 0 so that it draws step noise too (its condition draws then interleave with step draws).
    return {"eta": 0.7} if name == "ddim" else {"corrector_steps": 2} if name == "pc" else {}


def _draw_kinds(name: str, steps: int, corrector_steps: int = 2) -> list[str]:
    """What each draw of a re-noising sampler is for, in order: "x" (start or step noise) or "c" (condition)."""
    kinds = ["x"]
    for i in range(steps):
        if name == "em":
            kinds += ["c", "x"]
        elif name == "pc":
            kinds += ["c", "x"] * corrector_steps + ["c", "x"]
        elif name == "ode":
            kinds += ["c"]
        elif name == "ode-heun":
            kinds += ["c"] if i == steps - 1 else ["c", "c"]
        else:  # ddim, eta > 0
            kinds += ["c", "x"]
    return kinds


class Replay:
    """A noise_sampler that records its draws, or replays a given list."""

    def __init__(self, draws=None, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.source = None if draws is None else iter(draws)
        self.draws: list[torch.Tensor] = []

    def __call__(self, like):
        z = torch.randn(like.shape, generator=self.generator, dtype=like.dtype) if self.source is None \
            else next(self.source)
        self.draws.append(z)
        return z


def test_modes_are_the_score_loss_modes():
    from mmer_ext.models.score_net import CONDITION_NOISE

    assert CONDITION_MODES == CONDITION_NOISE == ("shared", "independent", "clean")


@pytest.mark.parametrize("name", NAMES)
def test_clean_passes_the_condition_itself(name):
    _, cond = make_problem(6, (3, 5), seed=3, dtype=torch.float64)
    seen = []

    def spy(x, t, c):
        seen.append(c)
        return gaussian_score(x, t, c)

    sample(name, spy, cond, steps=STEPS, condition_noise="clean", generator=torch.Generator().manual_seed(0),
           **_options(name))
    assert seen and all(c is cond for c in seen)


@pytest.mark.parametrize("name", NAMES)
def test_clean_is_renoising_with_zero_condition_noise(name):
    # Clean draws only the start and the step noise; a re-noising run fed the same draws, with zeros where it draws
    # condition noise, sees the condition itself everywhere and must give the same bits.
    _, cond = make_problem(6, (3, 5), seed=3, dtype=torch.float64)
    clean_noise = Replay(seed=1)
    clean = sample(name, gaussian_score, cond, steps=STEPS, condition_noise="clean", noise_sampler=clean_noise,
                   **_options(name))
    kinds = _draw_kinds(name, STEPS)
    assert len(clean_noise.draws) == kinds.count("x")
    x_draws = iter(clean_noise.draws)
    draws = [next(x_draws) if k == "x" else torch.zeros_like(cond) for k in kinds]
    for mode in ("shared", "independent"):
        replay = Replay(draws)
        renoised = sample(name, gaussian_score, cond, steps=STEPS, condition_noise=mode, noise_sampler=replay,
                          **_options(name))
        assert len(replay.draws) == len(kinds), mode
        assert torch.equal(renoised, clean), mode
    # and with real condition noise the result moves (the problem's score reads the condition)
    renoised = sample(name, gaussian_score, cond, steps=STEPS, condition_noise="shared",
                      noise_sampler=Replay([d if k == "x" else torch.ones_like(cond) for d, k in zip(draws, kinds)]),
                      **_options(name))
    assert not torch.equal(renoised, clean)


@pytest.mark.parametrize("name", NAMES)
def test_default_renoises_like_the_authors(name):
    _, cond = make_problem(6, (3, 5), seed=3, dtype=torch.float64)
    default, shared = Replay(seed=2), Replay(seed=2)
    a = sample(name, gaussian_score, cond, steps=STEPS, noise_sampler=default, **_options(name))
    b = sample(name, gaussian_score, cond, steps=STEPS, condition_noise="shared", noise_sampler=shared,
               **_options(name))
    assert torch.equal(a, b) and len(default.draws) == len(_draw_kinds(name, STEPS))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", CONDITION_MODES)
def test_scheduler_loop_follows_the_mode(name, mode):
    _, cond = make_problem(6, (3, 5), seed=3)
    opts = _options(name)
    sched = VEScheduler(method=name, condition_noise=mode, **opts)
    assert sched.condition_noise == mode and f"condition_noise={mode!r}" in repr(sched)
    a = sample_with_scheduler(sched, gaussian_score, cond, steps=STEPS, generator=torch.Generator().manual_seed(4))
    b = sample(name, gaussian_score, cond, steps=STEPS, condition_noise=mode,
               generator=torch.Generator().manual_seed(4), **opts)
    assert torch.equal(a, b)
    t = sched.timesteps[0]
    assert (sched.scale_condition(cond, t) is cond) == (mode == "clean")


def test_bad_mode_is_refused_everywhere():
    cond = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="condition_noise must be one of"):
        sample("em", gaussian_score, cond, steps=2, condition_noise="fresh")
    with pytest.raises(ValueError, match="condition_noise must be one of"):
        VEScheduler("ode", condition_noise=None)
    with pytest.raises(ValueError, match="condition_noise must be one of"):
        CUDAGraphSampler(gaussian_score, "em", condition_noise="noisy")
    graphed = CUDAGraphSampler(gaussian_score, "ddim", steps=3, condition_noise="clean")
    assert graphed.options["condition_noise"] == "clean"
    assert CUDAGraphSampler(gaussian_score, "em").options["condition_noise"] == "shared"


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_graph_replay_follows_the_mode(name):
    _, cond = make_problem(16, (8, 12), device="cuda")
    for mode in ("clean", "shared"):
        graphed = CUDAGraphSampler(gaussian_score, name, steps=6, condition_noise=mode, **_options(name))
        a = graphed(cond, generator=torch.Generator("cuda").manual_seed(5))
        b = sample(name, gaussian_score, cond, steps=6, condition_noise=mode,
                   generator=torch.Generator("cuda").manual_seed(5), **_options(name))
        assert torch.equal(a, b), mode
