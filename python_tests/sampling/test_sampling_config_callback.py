"""VEScheduler's config round trip (diffusers' ConfigMixin convention) and the samplers' per-step callback
(k-diffusion's convention)."""

from __future__ import annotations

import json

import pytest
import torch

from mmer_ext.sampling import VEScheduler, sample, sample_with_scheduler
from mmer_ext.sampling.schedulers import CONFIG_NAME
from sampling_problems import K, S, gaussian_score, make_problem, marginal_std  # noqa: E402

METHODS = ["em", "pc", "ode", "ode-heun", "ddim"]


# ---- config ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"method": "pc", "snr": 0.2, "corrector_steps": 2, "sigma": 30.0},
        {"method": "ddim", "eta": 0.5, "schedule": "karras", "eps": 1e-4},
        {"method": "ode-heun", "schedule": "linear"},
    ],
)
def test_config_round_trip(kwargs, tmp_path):
    sched = VEScheduler(**kwargs)
    config = sched.config
    assert json.loads(json.dumps(config)) == config  # plain JSON types
    for key, value in kwargs.items():
        assert config[key] == value
    assert VEScheduler.from_config(config).config == config
    assert VEScheduler(**config).config == config
    path = sched.save_config(tmp_path / "sched")
    assert path == tmp_path / "sched" / CONFIG_NAME
    saved = json.loads(path.read_text())
    assert saved["_class_name"] == "VEScheduler" and "_mmer_ext_version" in saved
    assert VEScheduler.from_config(tmp_path / "sched").config == config
    assert VEScheduler.from_config(path).config == config


def test_config_is_a_copy():
    sched = VEScheduler()
    sched.config["sigma"] = 1e9
    assert sched.config["sigma"] == 25.0


def test_from_config_overrides():
    sched = VEScheduler.from_config(VEScheduler(method="pc").config, corrector_steps=3)
    assert sched.method == "pc" and sched.corrector_steps == 3


def test_from_config_samples_the_same(tmp_path):
    mu, cond = make_problem(batch=8)
    sched = VEScheduler(method="ddim", eta=0.3, schedule="karras")
    sched.save_config(tmp_path)
    results = []
    for s in (sched, VEScheduler.from_config(tmp_path)):
        results.append(sample_with_scheduler(s, gaussian_score, cond, steps=6,
                                             generator=torch.Generator().manual_seed(4)))
    assert torch.equal(*results)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"method": "em", "sigmaa": 25.0}, "sigmaa"),
        ({"_class_name": "DDPMScheduler", "method": "em"}, "DDPMScheduler"),
        ({"method": "euler"}, "euler"),
        ({"method": "em", "sigma": 0.5}, "sigma"),
    ],
)
def test_from_config_rejects_bad_configs(config, match):
    with pytest.raises(ValueError, match=match):
        VEScheduler.from_config(config)


def test_load_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        VEScheduler.from_config(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        VEScheduler.from_config(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        VEScheduler.from_config(tmp_path)


# ---- callback -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_callback_once_per_step_without_changing_the_result(method):
    mu, cond = make_problem(batch=6)
    steps = 5
    seen = []
    kw = {"corrector_steps": 2} if method == "pc" else {}

    def callback(info):
        seen.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in info.items()})

    plain = sample(method, gaussian_score, cond, steps=steps, generator=torch.Generator().manual_seed(2), **kw)
    watched = sample(method, gaussian_score, cond, steps=steps, generator=torch.Generator().manual_seed(2),
                     callback=callback, **kw)
    assert torch.equal(plain, watched)
    assert [info["i"] for info in seen] == list(range(steps))
    assert set(seen[0]) == {"x", "i", "t", "sigma", "score", "denoised"}
    ts = torch.linspace(1.0, 1e-3, steps)
    for info in seen:
        t = ts[info["i"]]
        torch.testing.assert_close(info["t"].float(), t)
        torch.testing.assert_close(info["sigma"].double(), marginal_std(t), rtol=1e-5, atol=1e-6)
        assert info["x"].shape == cond.shape and info["score"].shape == cond.shape
        torch.testing.assert_close(info["denoised"], info["x"] + info["sigma"].float() ** 2 * info["score"])
    assert not torch.equal(seen[0]["x"], seen[-1]["x"])
    # With the exact score, denoised is Tweedie's E[x0 | x_t] = mu + s^2 / (s^2 + sigma^2) (x - mu): at t = 1 the
    # shrink factor is ~0.003, so denoised is close to mu although x is spread by std(1) ~ 10 (mu is read from the
    # re-noised condition, off by ~0.01).
    first = seen[0]
    assert (first["x"] - mu).abs().mean() > 3.0
    shrink = S**2 / (S**2 + first["sigma"].double() ** 2)
    bound = shrink * (first["x"].double() - mu.double()).abs() + 0.05
    assert ((first["denoised"].double() - mu.double()).abs() <= bound).all()
    assert (first["denoised"] - mu).abs().mean() < 0.05


def test_callback_sees_the_sample_before_each_update():
    # With x_init and the ODE (no noise but the condition's, negligible here by K) the first x is x_init exactly.
    mu, cond = make_problem(batch=4)
    x_init = torch.randn(cond.shape, generator=torch.Generator().manual_seed(0))
    xs = []
    sample("ode", gaussian_score, cond, steps=3, x_init=x_init, callback=lambda info: xs.append(info["x"].clone()))
    assert torch.equal(xs[0], x_init)
    assert len(xs) == 3 and not torch.equal(xs[1], x_init)


def test_callback_must_be_callable():
    _, cond = make_problem(batch=2)
    with pytest.raises(TypeError, match="callback"):
        sample("em", gaussian_score, cond, steps=2, callback="print")


def test_callback_and_cuda_graph_exclude_each_other():
    _, cond = make_problem(batch=2)
    with pytest.raises(ValueError, match="callback"):
        sample("em", gaussian_score, cond, steps=2, cuda_graph=True, callback=lambda info: None)


def test_constant_k_is_the_problem_scale():
    assert K == 1000.0  # the problems above rely on a negligible condition perturbation
