"""Samplers of IMDer's VE SDE over the fused step ops of :mod:`mmer_ext.ops`.

* :mod:`~mmer_ext.sampling.functional`: one function per sampler (k-diffusion style), ``sample(name, ...)`` and the
  :data:`SAMPLERS` table: ``"em"`` (IMDer's Euler–Maruyama), ``"pc"``, ``"ode"``, ``"ode-heun"``, ``"ddim"``.
* :mod:`~mmer_ext.sampling.schedulers`: :class:`VEScheduler`, the same samplers as a diffusers-style stateful object.
* :mod:`~mmer_ext.sampling.cuda_graph`: whole-loop CUDA-graph capture and replay (``cuda_graph=True`` or
  :class:`CUDAGraphSampler`).
* :mod:`~mmer_ext.sampling._core` (internal): the argument checks, time grid, plan, noise source, step updates and
  loops that the three above share, so they give the same bits.
"""

from mmer_ext.sampling.cuda_graph import CUDAGraphSampler, clear_cuda_graph_cache
from mmer_ext.sampling.functional import (
    CONDITION_MODES,
    SAMPLERS,
    sample,
    sample_ddim,
    sample_em,
    sample_ode,
    sample_ode_heun,
    sample_pc,
    ve_timesteps,
)
from mmer_ext.sampling.schedulers import VEScheduler, VESchedulerOutput, sample_with_scheduler

__all__ = [
    "CONDITION_MODES",
    "SAMPLERS",
    "CUDAGraphSampler",
    "VEScheduler",
    "VESchedulerOutput",
    "clear_cuda_graph_cache",
    "sample",
    "sample_ddim",
    "sample_em",
    "sample_ode",
    "sample_ode_heun",
    "sample_pc",
    "sample_with_scheduler",
    "ve_timesteps",
]
