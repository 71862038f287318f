"""Whole-loop CUDA-graph capture of the samplers (cuda_graph=True, CUDAGraphSampler).

Replaying a captured loop must give the eager loop's result from the same generator state (the ops draw their noise
in-kernel from the generator's graph-safe Philox state) and leave the generator where the eager loop leaves it."""

from __future__ import annotations

import pytest
import torch

from mmer_ext.sampling import CUDAGraphSampler, clear_cuda_graph_cache, sample, sample_em
from sampling_problems import gaussian_score, make_problem  # noqa: E402

NAMES = ["em", "pc", "ode", "ode-heun", "ddim"]


# ---------------------------------------------------------------------------------------------------------------------
# CPU: the option refuses clearly


def test_cuda_graph_refuses_cpu_tensors():
    _, cond = make_problem(2, (3,))
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA tensors, but cond is on cpu"):
        sample_em(gaussian_score, cond, steps=2, cuda_graph=True)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        CUDAGraphSampler(gaussian_score, "ddim", steps=2)(cond)


def test_cuda_graph_incompatible_options():
    _, cond = make_problem(2, (3,))
    with pytest.raises(ValueError, match="noise_sampler and grad=True are not supported"):
        sample_em(gaussian_score, cond, cuda_graph=True, noise_sampler=torch.randn_like)
    with pytest.raises(ValueError, match="noise_sampler and grad=True are not supported"):
        sample_em(gaussian_score, cond, cuda_graph=True, grad=True)


def test_graph_sampler_checks_its_options():
    with pytest.raises(ValueError, match="unknown sampler 'rk4'"):
        CUDAGraphSampler(gaussian_score, "rk4")
    with pytest.raises(TypeError, match="unknown \\['eta'\\]"):
        CUDAGraphSampler(gaussian_score, "em", eta=0.5)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        CUDAGraphSampler(gaussian_score, "em", steps=0)
    with pytest.raises(ValueError, match="warmup must be >= 0"):
        CUDAGraphSampler(gaussian_score, "em", warmup=-1)
    with pytest.raises(TypeError, match="score_fn must be callable"):
        CUDAGraphSampler(3, "em")
    s = CUDAGraphSampler(gaussian_score, "pc", steps=4, snr=0.2)
    assert s.options["snr"] == 0.2 and s.options["corrector_steps"] == 1 and s.num_graphs == 0


# ---------------------------------------------------------------------------------------------------------------------
# CUDA: replay == eager


def _options(name):
    return {"eta": 0.5} if name == "ddim" else {}


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_replay_equals_eager_and_follows_new_inputs(name):
    _, cond = make_problem(16, (8, 12), device="cuda")
    _, cond2 = make_problem(16, (8, 12), seed=2, device="cuda")
    graphed = CUDAGraphSampler(gaussian_score, name, steps=8, **_options(name))
    g_graph = torch.Generator("cuda").manual_seed(5)
    g_eager = torch.Generator("cuda").manual_seed(5)

    first = graphed(cond, generator=g_graph)
    ref = sample(name, gaussian_score, cond, steps=8, generator=g_eager, **_options(name))
    assert torch.equal(first, ref)
    assert torch.equal(g_graph.get_state(), g_eager.get_state())

    # a new condition through the same graph: the new result, with the generators still in step
    second = graphed(cond2, generator=g_graph)
    ref2 = sample(name, gaussian_score, cond2, steps=8, generator=g_eager, **_options(name))
    assert torch.equal(second, ref2)
    assert not torch.equal(second, first)
    assert graphed.num_graphs == 1
    # the first result was handed out as a copy, not overwritten by the second replay
    assert torch.equal(first, ref)


@pytest.mark.cuda
def test_default_generator_and_x_init():
    mu, cond = make_problem(8, (4, 6), device="cuda")
    graphed = CUDAGraphSampler(gaussian_score, "ode-heun", steps=5)
    torch.cuda.manual_seed(3)
    a = graphed(cond)
    torch.cuda.manual_seed(3)
    b = sample("ode-heun", gaussian_score, cond, steps=5)
    assert torch.equal(a, b)

    x_init = torch.randn(cond.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    g1, g2 = torch.Generator("cuda").manual_seed(1), torch.Generator("cuda").manual_seed(1)
    c = graphed(cond, generator=g1, x_init=x_init)
    d = sample("ode-heun", gaussian_score, cond, steps=5, generator=g2, x_init=x_init)
    assert torch.equal(c, d)
    # with / without x_init and default / own generator are separate graphs
    assert graphed.num_graphs == 2
    x_init2 = x_init + 1
    assert torch.equal(graphed(cond, generator=g1, x_init=x_init2),
                       sample("ode-heun", gaussian_score, cond, steps=5, generator=g2, x_init=x_init2))


@pytest.mark.cuda
def test_new_shape_new_graph_and_reset():
    graphed = CUDAGraphSampler(gaussian_score, "em", steps=3)
    for batch in (4, 6, 4):
        _, cond = make_problem(batch, (5,), device="cuda")
        graphed(cond, generator=torch.Generator("cuda").manual_seed(0))
    assert graphed.num_graphs == 2
    graphed.reset()
    assert graphed.num_graphs == 0
    assert graphed(torch.empty(0, 5, device="cuda")).shape == (0, 5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_replay_equals_eager_dtypes(dtype):
    _, cond = make_problem(8, (4, 6), dtype=dtype, device="cuda")
    g1, g2 = torch.Generator("cuda").manual_seed(2), torch.Generator("cuda").manual_seed(2)
    a = CUDAGraphSampler(gaussian_score, "em", steps=6)(cond, generator=g1)
    b = sample_em(gaussian_score, cond, steps=6, generator=g2)
    assert a.dtype == dtype and torch.equal(a, b)


class TinyScoreNet(torch.nn.Module):
    """A small conditional network (conv + time embedding + cross term), capturable like IMDer's ScoreNet."""

    def __init__(self, channels=4):
        super().__init__()
        self.conv = torch.nn.Conv1d(2 * channels, channels, 3, padding=1)
        self.time = torch.nn.Linear(1, channels)

    def forward(self, x, t, c):
        h = self.conv(torch.cat([x, c], dim=1)) + self.time(t[:, None].to(x.dtype))[:, :, None]
        return torch.tanh(h) - x

    def score(self, x, t, c):
        return self.forward(x, t, c)


@pytest.mark.cuda
@pytest.mark.parametrize("use_method", [False, True])
def test_functional_cuda_graph_option_with_a_module(use_method):
    torch.manual_seed(0)
    net = TinyScoreNet().cuda().eval()
    fn = net.score if use_method else net
    cond = torch.randn(8, 4, 12, device="cuda")
    clear_cuda_graph_cache()
    for seed in (0, 1):
        a = sample("ddim", fn, cond, steps=6, cuda_graph=True, generator=torch.Generator("cuda").manual_seed(seed))
        b = sample("ddim", fn, cond, steps=6, generator=torch.Generator("cuda").manual_seed(seed))
        assert torch.equal(a, b)
    # in-place parameter updates are seen by the captured graph
    with torch.no_grad():
        net.conv.weight.mul_(0.5)
    a = sample("ddim", fn, cond, steps=6, cuda_graph=True, generator=torch.Generator("cuda").manual_seed(0))
    b = sample("ddim", fn, cond, steps=6, generator=torch.Generator("cuda").manual_seed(0))
    assert torch.equal(a, b)
    clear_cuda_graph_cache()


@pytest.mark.cuda
def test_functional_cache_refuses_unhashable_score_fn():
    class Unhashable:
        __hash__ = None

        def __call__(self, x, t, c):
            return gaussian_score(x, t, c)

    _, cond = make_problem(2, (3,), device="cuda")
    with pytest.raises(ValueError, match="CUDAGraphSampler"):
        sample_em(Unhashable(), cond, steps=2, cuda_graph=True)
