"""A diffusers-style scheduler for the VE SDE of IMDer: the functional samplers as a stateful object you drive.

The loop that reproduces :func:`mmer_ext.sampling.sample` bit for bit (same generator state -> same tensors)::

    sched = VEScheduler(method="em")                  # "em" | "pc" | "ode" | "ode-heun" | "ddim"
    sched.set_timesteps(100, device=cond.device)
    x = sched.init_noise(cond.shape, generator=g, device=cond.device, dtype=cond.dtype)
    for t in sched.timesteps:
        tb = t.expand(cond.shape[0])
        for _ in range(sched.corrector_steps_at(t)):  # 0 unless method == "pc"
            c = sched.scale_condition(cond, t, generator=g)
            x = sched.step_correct(score_fn(x, tb, c), x, generator=g).prev_sample
        c = sched.scale_condition(cond, t, generator=g)
        out = sched.step(score_fn(x, tb, c), t, x, generator=g)
        x = out.prev_sample
    result = out.prev_sample_mean                      # EM / PC: the last mean; ODE / DDIM: == prev_sample

:func:`sample_with_scheduler` is that loop.

Heun (``method="ode-heun"``) needs two score evaluations per step; like diffusers' ``HeunDiscreteScheduler`` the
scheduler is a two-call state machine: ``.timesteps`` lists ``ts[0], ts[1], ts[1], ts[2], ts[2], ..., ts[N-1],
ts[N-1]`` (``2N - 1`` entries). The first call of a pair takes the Euler step and returns the point where the next
score is wanted (its time is the next entry); the second call gets the score there and returns the Heun-corrected
sample. The final entry is a plain Euler step. The same user loop above drives it unchanged.

The options round-trip through a plain, JSON-serialisable dict, as diffusers' ``ConfigMixin`` does (without
depending on diffusers): ``VEScheduler.from_config(sched.config)`` is an equal scheduler, and
``sched.save_config(dir)`` / ``VEScheduler.from_config(dir)`` go through ``dir/scheduler_config.json``.

``step`` tracks its position with a counter: call it once per entry of ``.timesteps``, in order (``set_timesteps``
resets it). ``t`` itself is passed to the ops (so a float or a tensor with the grid's value both work).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmer_ext import ops as _ops
from mmer_ext.sampling import _core as core

__all__ = ["CONFIG_NAME", "VEScheduler", "VESchedulerOutput", "sample_with_scheduler"]

CONFIG_NAME = "scheduler_config.json"  # diffusers' file name for a scheduler's config


@dataclass
class VESchedulerOutput:
    """Result of one :meth:`VEScheduler.step`.

    Attributes:
        prev_sample: the sample at the next time (feed it to the next step).
        prev_sample_mean: the noise-free part of ``prev_sample`` (EM/PC: the step's mean, IMDer's returned value
            after the last step; Langevin: the mean of the move; ODE and DDIM with ``eta = 0``: ``prev_sample``).
        pred_original_sample: the ``x0`` prediction (DDIM only, else ``None``).
    """

    prev_sample: Tensor
    prev_sample_mean: Tensor
    pred_original_sample: Tensor | None = None


class VEScheduler:
    """Stateful VE SDE sampler (diffusers' ``set_timesteps`` / ``step`` protocol) over the fused ops.

    Args:
        method: ``"em"`` (IMDer's Euler–Maruyama), ``"pc"`` (plus ``corrector_steps`` Langevin moves per time, via
            :meth:`step_correct`), ``"ode"`` (probability-flow Euler), ``"ode-heun"`` (two-call Heun),
            ``"ddim"`` (the VE model through :func:`mmer_ext.ops.ddim_step`).
        sigma, eps: the SDE and the last grid time, as in :func:`mmer_ext.sampling.sample_em`.
        snr, corrector_steps: the Langevin corrector (``"pc"`` only).
        eta: DDIM's noise level in ``[0, 1]`` (``"ddim"`` only).
        schedule: ``"imder"`` (IMDer's grid and uniform ``dt``), ``"linear"`` or ``"karras"``, as in
            :func:`mmer_ext.sampling.sample_em`.
        condition_noise: the score network's condition mode, as in :func:`mmer_ext.sampling.sample_em`:
            ``"shared"`` (default) / ``"independent"``: :meth:`scale_condition` re-noises the condition;
            ``"clean"``: it returns the condition unchanged.
    """

    def __init__(self, method: str = "em", sigma: float = 25.0, eps: float = 1e-3, snr: float = 0.16,
                 corrector_steps: int = 1, eta: float = 0.0, schedule: str = "imder",
                 condition_noise: str = "shared"):
        if method not in core.METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {list(core.METHODS)}")
        # steps is checked in set_timesteps; 1 stands in here so the shared checks can run now.
        opts = core.checked_options(method, steps=1, sigma=sigma, eps=eps, schedule=schedule, snr=snr,
                                  corrector_steps=corrector_steps, eta=eta, condition_noise=condition_noise)
        self.method = method
        self.sigma = opts["sigma"]
        self.eps = opts["eps"]
        self.schedule = opts["schedule"]
        self.condition_noise = opts["condition_noise"]
        self.snr = opts.get("snr", float(snr))
        self.corrector_steps = opts.get("corrector_steps", 0)
        self.eta = opts.get("eta", 0.0)
        self.order = 2 if method == "ode-heun" else 1
        self.num_inference_steps: int | None = None
        self.timesteps: Tensor | None = None
        self._plan: core.Plan | None = None
        self._index = 0
        self._heun_start: Tensor | None = None

    _CONFIG_KEYS = ("method", "sigma", "eps", "snr", "corrector_steps", "eta", "schedule")

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments as a new plain dict (JSON-serialisable): ``VEScheduler(**config)`` rebuilds an
        equal scheduler. Options the method does not use hold the values it runs with (``corrector_steps = 0``
        outside ``"pc"``, ``eta = 0`` outside ``"ddim"``)."""
        return {key: getattr(self, key) for key in self._CONFIG_KEYS}

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | os.PathLike, **overrides: Any) -> VEScheduler:
        """A scheduler from :attr:`config` (a mapping), or from a ``scheduler_config.json`` written by
        :meth:`save_config` (its path, or the directory holding it); ``overrides`` replace entries.

        Keys starting with ``_`` (``_class_name``, versions) are metadata; any other unknown key is an error, so a
        misspelt option is not silently dropped.
        """
        if not isinstance(config, Mapping):
            config = cls.load_config(config)
        unknown = sorted(k for k in {**config, **overrides} if k not in cls._CONFIG_KEYS and not k.startswith("_"))
        if unknown:
            raise ValueError(f"VEScheduler.from_config: unknown keys {unknown}; expected {list(cls._CONFIG_KEYS)}")
        class_name = config.get("_class_name", cls.__name__)
        if class_name != cls.__name__:
            raise ValueError(f"VEScheduler.from_config: the config is for {class_name!r}, not {cls.__name__!r}")
        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        kwargs.update(overrides)
        return cls(**kwargs)

    @staticmethod
    def load_config(path: str | os.PathLike) -> dict[str, Any]:
        """Read a saved config: ``path`` is the JSON file or the directory holding ``scheduler_config.json``."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"VEScheduler.load_config: no scheduler config at {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"VEScheduler.load_config: {path} is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"VEScheduler.load_config: {path} must hold a JSON object, got {type(config).__name__}")
        return config

    def save_config(self, save_directory: str | os.PathLike) -> Path:
        """Write :attr:`config` (with ``_class_name`` and the mmer_ext version) to
        ``save_directory/scheduler_config.json``, atomically; returns the file's path."""
        from mmer_ext import __version__
        from mmer_ext._atomic import atomic_write_text

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = {"_class_name": type(self).__name__, "_mmer_ext_version": __version__, **self.config}
        return atomic_write_text(directory / CONFIG_NAME, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def __repr__(self) -> str:
        return (f"VEScheduler(method={self.method!r}, sigma={self.sigma}, eps={self.eps}, snr={self.snr}, "
                f"corrector_steps={self.corrector_steps}, eta={self.eta}, schedule={self.schedule!r}, "
                f"condition_noise={self.condition_noise!r}, num_inference_steps={self.num_inference_steps})")

    @property
    def init_noise_sigma(self) -> float:
        """``std(1)``, the standard deviation of the start sample."""
        return float(_ops.ve_marginal_std(torch.tensor(1.0, dtype=torch.float64), self.sigma))

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> None:
        """Build the grid ``linspace(1, eps, num_inference_steps)`` on ``device`` and reset the step counter.

        ``dtype`` is the samples' dtype (float64 samples get a float64 clock, all others float32, as in the
        functional samplers).
        """
        steps = core.check_int("num_inference_steps", num_inference_steps, 1)
        device = torch.device(device) if device is not None else torch.device("cpu")
        # The batch size only shapes the functional sampler's [steps, B] time table, unused here.
        self._plan = core.make_plan(self.method, 0, device, dtype, steps=steps, sigma=self.sigma, eps=self.eps,
                                  schedule=self.schedule, snr=self.snr, corrector_steps=self.corrector_steps,
                                  eta=self.eta, condition_noise=self.condition_noise)
        ts = self._plan.ts
        if self.method == "ode-heun":
            ts = torch.cat([ts[:1], ts[1:].repeat_interleave(2)])
        self.num_inference_steps = steps
        self.timesteps = ts
        self._index = 0
        self._heun_start = None

    @property
    def step_index(self) -> int:
        """How many entries of ``.timesteps`` have been stepped since :meth:`set_timesteps`."""
        return self._index

    @property
    def dts(self) -> tuple[float, ...]:
        """Step sizes in ``t``, one per grid time (all equal with ``schedule="imder"``)."""
        return self._require_plan().dts

    def _grid_index(self) -> int:
        # Heun's entries come in pairs on the same grid step: entry k belongs to grid step k // 2.
        return self._index // 2 if self.method == "ode-heun" else self._index

    def corrector_steps_at(self, t: Tensor | float | None = None) -> int:
        """Langevin moves to run before the step at ``t``: ``corrector_steps`` for ``"pc"``, else 0."""
        return self.corrector_steps if self.method == "pc" else 0

    def _require_plan(self) -> core.Plan:
        if self._plan is None:
            raise RuntimeError("call set_timesteps(num_inference_steps, device) before stepping the scheduler")
        return self._plan

    def init_noise(self, shape, generator: torch.Generator | None = None, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> Tensor:
        """The start sample ``x ~ N(0, std(1)^2 I)`` of ``shape`` (the functional samplers' draw, same bits)."""
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        device = torch.device(device)
        dtype = dtype or torch.get_default_dtype()
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but the noise is requested on {device}")
        return core.initial_sample(torch.Size(shape), dtype, device, self.sigma, core.Noise(generator))

    def scale_condition(self, cond: Tensor, t: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
        """The condition the score sees at time ``t`` (call it per score evaluation): ``cond + std(t) z`` with fresh
        noise (IMDer's), or ``cond`` itself with ``condition_noise="clean"``."""
        return core.condition(cond, t, self.sigma, core.Noise(generator), self.condition_noise != "clean")

    def step_correct(self, score: Tensor, x: Tensor, generator: torch.Generator | None = None) -> VESchedulerOutput:
        """One Langevin corrector move at the current time (``"pc"``); does not advance the step counter."""
        self._require_plan()
        if self.method != "pc":
            raise RuntimeError(f"step_correct is the corrector of method='pc', this scheduler is {self.method!r}")
        x_next, mean = core.langevin_update(x, score, self.snr, core.Noise(generator))
        return VESchedulerOutput(x_next, mean)

    def step(self, score: Tensor, t: Tensor | float, x: Tensor, generator: torch.Generator | None = None,
             return_dict: bool = True) -> VESchedulerOutput | tuple[Tensor, Tensor]:
        """Advance ``x`` from ``t`` (the current entry of ``.timesteps``) with the score ``score`` evaluated there.

        Returns :class:`VESchedulerOutput` (or ``(prev_sample, prev_sample_mean)`` with ``return_dict=False``).
        """
        plan = self._require_plan()
        if self._index >= len(self.timesteps):
            raise RuntimeError(f"all {len(self.timesteps)} timesteps have been stepped; call set_timesteps again")
        if score.shape != x.shape:
            raise ValueError(f"score must be shaped like x {tuple(x.shape)}, got {tuple(score.shape)}")
        noise = core.Noise(generator)
        x0 = None
        if self.method in ("em", "pc"):
            prev, mean = core.em_update(x, score, t, plan.dts[self._index], plan.sigma, noise)
        elif self.method == "ode":
            prev = mean = core.ode_update(x, score, t, plan.dts[self._index], plan.sigma)
        elif self.method == "ode-heun":
            prev = mean = self._heun(x, score, t, plan)
        else:
            prev, x0 = core.ddim_update(x, score, plan, self._index, noise)
            mean = prev if self.eta == 0 else self._ddim_mean(x, score, x0)
        self._index += 1
        out = VESchedulerOutput(prev, mean, x0)
        return out if return_dict else (out.prev_sample, out.prev_sample_mean)

    def _heun(self, x: Tensor, score: Tensor, t, plan: core.Plan) -> Tensor:
        k = self._index
        x_e = core.ode_update(x, score, t, plan.dts[self._grid_index()], plan.sigma)
        if k % 2 == 1:  # second call of a pair: x is the Euler point, score was taken there
            start, self._heun_start = self._heun_start, None
            return core.heun_average(start, x_e)
        if k == len(self.timesteps) - 1:  # the final entry: plain Euler
            return x_e
        self._heun_start = x
        return x_e

    def _ddim_mean(self, x: Tensor, score: Tensor, x0: Tensor) -> Tensor:
        # Noise-free part of the eta > 0 step, in the VE scale: x0 + sqrt(1 - ab' - s^2) / sqrt(ab') * eps_hat.
        plan, i = self._plan, self._index
        ab, ab_n = plan.ddim_ab[i], plan.ddim_ab_next[i]
        s2 = (self.eta ** 2) * (1 - ab_n) / (1 - ab) * (1 - ab / ab_n)
        coef = torch.sqrt(torch.clamp(1 - ab_n - s2, min=0)) / torch.sqrt(ab_n)
        return x0 + coef * (score * plan.ddim_eps[i])


def sample_with_scheduler(scheduler: VEScheduler, score_fn: core.ScoreFn, cond: Tensor, *, steps: int = 100,
                          generator: torch.Generator | None = None, x_init: Tensor | None = None,
                          grad: bool = False) -> Tensor:
    """The documented scheduler loop (module docstring): same result as ``sample(scheduler.method, ...)`` with the
    same options and generator state."""
    core.check_cond(cond)
    core.check_x_init(x_init, cond)
    core.check_randomness(generator, None, cond)
    scheduler.set_timesteps(steps, device=cond.device, dtype=cond.dtype)
    if cond.shape[0] == 0:
        return torch.empty_like(cond)
    with contextlib.nullcontext() if grad else torch.no_grad():
        x = x_init if x_init is not None else scheduler.init_noise(cond.shape, generator, cond.device, cond.dtype)
        out = None
        for t in scheduler.timesteps:
            tb = t.expand(cond.shape[0])
            for _ in range(scheduler.corrector_steps_at(t)):
                c = scheduler.scale_condition(cond, t, generator)
                x = scheduler.step_correct(core.evaluate_score(score_fn, x, tb, c), x, generator).prev_sample
            c = scheduler.scale_condition(cond, t, generator)
            out = scheduler.step(core.evaluate_score(score_fn, x, tb, c), t, x, generator)
            x = out.prev_sample
    return out.prev_sample_mean
