"""Capture a whole sampling loop in one CUDA graph and replay it.

IMDer's 100-step sampler launches a few hundred small kernels per step (the score network plus the step ops); at
its sizes the GPU mostly waits for the CPU. Replaying one captured graph removes that launch overhead. The samplers'
loops are capturable by construction: the time grid, ``dt`` and every schedule coefficient are computed before the
loop (:func:`mmer_ext.sampling._core.make_plan`), the ops read their times on the device, and all noise -- the
start sample included -- is drawn inside the kernels from a generator through its graph-safe Philox state.

Two entry points:

* :class:`CUDAGraphSampler` ``(score_fn, sampler="em", steps=..., ...)``: you hold the graphs. Call it like a
  sampler: ``x = graphed(cond, generator=g)``. One graph per (shape, dtype, device, generator, with/without
  ``x_init``); the sampler and its options are fixed per instance.
* ``sample_*(..., cuda_graph=True)``: the same, with the graphs cached per ``score_fn`` in a weak-keyed module
  cache (freed with the score function's owner: the module of a bound method, the module or function itself).
  :func:`clear_cuda_graph_cache` frees them now.

How a call works: on the first call with a new key, the loop runs ``warmup`` times eagerly on a side stream
(lazy initialisations, cuBLAS workspaces, allocator pools), then is captured once with static input buffers (the
condition and, if given, ``x_init``); the generator's state is restored to what it was before the warm-up. Every call
(the first included) copies its inputs into the static buffers and replays the graph. Replaying consumes the
generator exactly as the eager loop does, so the same generator state gives the same result as
``sample_*(..., cuda_graph=False)`` -- up to the score network's own determinism -- and leaves the generator in the
same state.

``score_fn`` must be capturable: no host synchronisation (``.item()``, ``.cpu()``, printing tensors, data-dependent
shapes or Python branches on tensor values), no CPU tensors created and copied per call, and randomness only through
CUDA generators (the default CUDA generator is registered automatically; dropout should be off: ``model.eval()``).
The graph freezes what Python decided during capture: the module's mode, which parameter tensors it reads (in-place
updates such as optimizer steps are seen by later replays; parameters replaced by new tensors, ``.to()`` moves, are
not: make a new sampler or clear the cache) and every shape. The warm-up runs ``score_fn`` eagerly, so modules with
running statistics in training mode would update them.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from mmer_ext.sampling import _core as core

__all__ = ["CUDAGraphSampler", "clear_cuda_graph_cache", "graphed_sample"]

_COMMON = ("steps", "sigma", "eps", "schedule", "condition_noise")
_OPTION_NAMES = {
    "em": _COMMON,
    "pc": _COMMON + ("snr", "corrector_steps"),
    "ode": _COMMON,
    "ode-heun": _COMMON,
    "ddim": _COMMON + ("eta",),
}
_DEFAULTS = {"steps": 100, "sigma": 25.0, "eps": 1e-3, "schedule": "imder", "snr": 0.16, "corrector_steps": 1,
             "eta": 0.0, "condition_noise": "shared"}


def _require_cuda(cond: Tensor) -> None:
    if cond.device.type != "cuda":
        raise ValueError(
            f"cuda_graph=True needs CUDA tensors, but cond is on {cond.device}: CUDA graphs record GPU kernels "
            "only. Sample on the CPU without cuda_graph, or move cond (and score_fn) to a CUDA device.")


def _resolve_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if generator is None:
        return torch.cuda.default_generators[index]
    if generator.device.type != "cuda" or (generator.device.index or 0) != index:
        raise ValueError(f"generator is on {generator.device} but cond is on {device}")
    return generator


def _is_default_generator(generator: torch.Generator) -> bool:
    return any(generator is g for g in torch.cuda.default_generators)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    cond: Tensor  # static input buffer
    x_init: Tensor | None  # static input buffer
    out: Tensor  # static output (graph pool)
    plan: core.Plan  # keeps the schedule tensors the graph reads alive
    generator: torch.Generator


def _capture(method: str, score_fn: core.ScoreFn, cond: Tensor, x_init: Tensor | None, generator: torch.Generator,
             warmup: int, opts: dict) -> _Captured:
    device = cond.device
    with torch.cuda.device(device), torch.no_grad():
        plan = core.make_plan(method, cond.shape[0], device, cond.dtype, **opts)
        static_cond = cond.detach().clone()
        static_x = x_init.detach().clone() if x_init is not None else None
        noise = core.Noise(generator)
        saved_state = generator.get_state()

        def run() -> Tensor:
            return core.run_loop(plan, score_fn, static_cond, static_x, noise)

        entry_stream = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(entry_stream)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                run()
        entry_stream.wait_stream(side)
        torch.cuda.synchronize(device)

        graph = torch.cuda.CUDAGraph()
        if not _is_default_generator(generator):
            # capture_begin registers only the default generator; any other must be registered before it, or its
            # Philox offset cannot advance inside the capture.
            graph.register_generator_state(generator)
        try:
            with torch.cuda.graph(graph, stream=side):
                out = run()
        finally:
            # The warm-up consumed random numbers; the capture itself does not advance the generator (its draws
            # are offsets relative to the state at replay), so restoring makes the first replay draw what an eager
            # call from the caller's state would.
            generator.set_state(saved_state)
    return _Captured(graph, static_cond, static_x, out, plan, generator)


def _replay(entry: _Captured, cond: Tensor, x_init: Tensor | None, clone_output: bool) -> Tensor:
    with torch.cuda.device(cond.device), torch.no_grad():
        entry.cond.copy_(cond)
        if x_init is not None:
            entry.x_init.copy_(x_init)
        entry.graph.replay()
        # The static output is overwritten by the next replay: hand out a copy unless asked not to.
        return entry.out.clone() if clone_output else entry.out


def _key(method: str, cond: Tensor, x_init: Tensor | None, generator: torch.Generator, opts: dict) -> tuple:
    return (method, tuple(cond.shape), cond.dtype, cond.device, x_init is not None, generator,
            tuple(sorted(opts.items())))


class CUDAGraphSampler:
    """A sampler whose whole loop is captured in a CUDA graph per input signature and replayed per call.

    Args:
        score_fn: the (capturable) score function, ``score_fn(x, t, c) -> score``; held by this object.
        sampler: ``"em"``, ``"pc"``, ``"ode"``, ``"ode-heun"`` or ``"ddim"``.
        warmup: eager runs on a side stream before the capture (``>= 0``).
        clone_output: return a copy of the graph's output buffer (default) instead of the buffer itself, which the
            next replay of the same graph overwrites.
        **options: the sampler's options (``steps``, ``sigma``, ``eps``, ``schedule``, ``condition_noise``; ``snr`` and
            ``corrector_steps`` for pc, ``eta`` for ddim), checked now.

    ``sampler(cond, generator=None, x_init=None)`` returns the sample; ``cond`` must be a CUDA tensor. Equal to
    ``mmer_ext.sampling.sample(name, score_fn, cond, generator=..., **options)`` from the same generator state.
    """

    def __init__(self, score_fn: core.ScoreFn, sampler: str = "em", *, warmup: int = 1, clone_output: bool = True,
                 **options):
        if not callable(score_fn):
            raise TypeError(f"score_fn must be callable (x, t, cond) -> score, got {type(score_fn).__name__}")
        if sampler not in _OPTION_NAMES:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(_OPTION_NAMES)}")
        unknown = set(options) - set(_OPTION_NAMES[sampler])
        if unknown:
            raise TypeError(f"sampler {sampler!r} takes the options {list(_OPTION_NAMES[sampler])}, got unknown "
                            f"{sorted(unknown)}")
        merged = {name: options.get(name, _DEFAULTS[name]) for name in _OPTION_NAMES[sampler]}
        self.score_fn = score_fn
        self.sampler = sampler
        self.warmup = core.check_int("warmup", warmup, 0)
        self.clone_output = bool(clone_output)
        self.options = core.checked_options(sampler, **merged)
        self._graphs: dict[tuple, _Captured] = {}

    def __repr__(self) -> str:
        return f"CUDAGraphSampler(sampler={self.sampler!r}, options={self.options}, graphs={len(self._graphs)})"

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def reset(self) -> None:
        """Drop every captured graph (their memory pools are freed)."""
        self._graphs.clear()

    def __call__(self, cond: Tensor, *, generator: torch.Generator | None = None,
                 x_init: Tensor | None = None) -> Tensor:
        core.check_cond(cond)
        core.check_x_init(x_init, cond)
        _require_cuda(cond)
        return _graphed(self._graphs, self.score_fn, self.sampler, cond, generator, x_init, self.warmup,
                        self.clone_output, self.options)


def _graphed(cache: dict, score_fn: core.ScoreFn, method: str, cond: Tensor, generator: torch.Generator | None,
             x_init: Tensor | None, warmup: int, clone_output: bool, opts: dict) -> Tensor:
    gen = _resolve_generator(generator, cond.device)
    if cond.shape[0] == 0:
        return torch.empty_like(cond)
    key = _key(method, cond, x_init, gen, opts)
    entry = cache.get(key)
    if entry is None:
        entry = _capture(method, score_fn, cond, x_init, gen, warmup, opts)
        cache[key] = entry
    return _replay(entry, cond, x_init, clone_output)


# score_fn owner -> {(function, signature...) -> _Captured}. Entries hold no reference to score_fn (a bound method
# would keep its module, hence its own key, alive), so a module's graphs go when the module goes.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _owner(score_fn: core.ScoreFn) -> tuple[object, object]:
    if inspect.ismethod(score_fn):
        return score_fn.__self__, score_fn.__func__
    return score_fn, None


def graphed_sample(method: str, score_fn: core.ScoreFn, cond: Tensor, *, generator: torch.Generator | None = None,
                   x_init: Tensor | None = None, warmup: int = 1, **opts) -> Tensor:
    """``sample_<method>(..., cuda_graph=True)``: capture on first use per (score_fn, signature), replay after.

    ``opts`` are the sampler's checked options. The graphs live in a module cache weakly keyed by ``score_fn``'s
    owner; a score function that cannot be weakly referenced (or hashed) is refused -- use
    :class:`CUDAGraphSampler` to hold its graphs explicitly.
    """
    _require_cuda(cond)
    owner, func = _owner(score_fn)
    try:
        per_owner = _CACHE.get(owner)
        if per_owner is None:
            per_owner = _CACHE[owner] = {}
    except TypeError:
        raise ValueError(
            f"cuda_graph=True caches its graphs per score_fn, which must be weakly referenceable and hashable "
            f"(functions, bound methods and nn.Modules are); {type(score_fn).__name__} is not. Use "
            "mmer_ext.sampling.CUDAGraphSampler(score_fn, ...) to hold the graphs yourself.") from None
    cache = per_owner.setdefault(func, {})
    return _graphed(cache, score_fn, method, cond, generator, x_init, warmup, True, opts)


def clear_cuda_graph_cache() -> None:
    """Free every graph captured through ``cuda_graph=True``."""
    _CACHE.clear()
