"""Benchmarks of ``mmer_ext.ops.angular_adjacency`` (MMGCN's dialogue graph) against what users run today.

Implementations, timed in the same run:

* ``ours``: ``mmer_ext.ops.angular_adjacency`` (C++/CUDA kernels: one GEMM per dialogue and modality for the
  cosines, fused arccos / window / degree / scaling passes, a fused backward).
* ``mmgcn-loop``: ``angular_adjacency_mmgcn_loop``, the dense graph built the way MMGCN's ``create_big_adj`` does it
  (Python loops over dialogues, modalities, utterances and modality pairs). It takes ~0.5 s (fwd) and ~18 s
  (fwd+bwd) per call on the 2-core dev machine, so it runs at the ``batch`` size only, with one timed round (plus the
  warm-up and the correctness check: three calls), and not at all under ``--benchmark-disable``.
* ``eager``: :func:`vectorized_eager` below, the fastest vectorised PyTorch version we could write: the unit
  vectors gathered into padded ``[M, G, Lmax, D]`` dialogues, one batched matmul for every intra-modality block,
  elementwise arccos, the blocks assembled by concatenation (faster in backward than slice assignment, which we
  also tried), then scattered into the dense matrix with one ``index_put`` for ``layout="dense"``. Its index maps
  are computed once per batch outside the timed call (the best case for it). On a quiet machine it takes 12.8 ms
  (fwd) and 37.5 ms (fwd+bwd) at the ``test`` size with the blocks layout, in line with the 11 / 39 ms quoted for a
  good vectorised version in the issue.
* ``compiled``: ``torch.compile`` of ``vectorized_eager``, default mode, ``dynamic=False`` (one graph per size).
* ``compiled-max-autotune`` (CUDA only): the same with ``mode="max-autotune-no-cudagraphs"``.

Sizes (M = 3 modalities, D = 200, float32, dialogue lengths drawn once in [10, 110] with a fixed seed):
``batch`` = an IEMOCAP training batch, 16 dialogues / 781 utterances; ``test`` = the IEMOCAP test set, 31 dialogues
/ 1623 utterances. Both layouts: ``dense`` ([M N, M N]; 95 MB at the test size) and ``blocks`` ([G, M Lmax, M Lmax]).
``fwd`` times the adjacency alone; ``fwd+bwd`` also ``torch.autograd.grad`` of ``(A * C).sum()`` for a fixed random
``C`` with respect to the features (no ``.grad`` accumulation, so every round does the same work).

Correctness guard: before timing, every implementation's adjacency (and, for fwd+bwd, the gradient) must match
the float64 ``angular_adjacency_ref`` on the same inputs at float32 tolerances, so a fast-but-wrong kernel cannot
report a win.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import mmer_ext
from support import COMPILE_MODES, HAS_CUDA, allow_many_recompiles, ours_cuda_skip_reason, sync
from mmer_ext.ops import angular_adjacency
from mmer_ext.ops._reference import angular_adjacency_mmgcn_loop, angular_adjacency_ref

M_MODALITIES = 3
FEATURES = 200
SCALE = 0.99999
SIZES = {"batch": (16, 781), "test": (31, 1623)}
LAYOUTS = ("dense", "blocks")
MODES = ("fwd", "fwd+bwd")

allow_many_recompiles()


def dialogue_lengths(num_dialogues: int, total: int, seed: int = 0) -> torch.Tensor:
    """``num_dialogues`` lengths in [10, 110] summing to ``total`` (IEMOCAP's range), the same on every run."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(10, 111, (num_dialogues,), generator=gen).double()
    lengths = (lengths / lengths.sum() * total).round().long().clamp(10, 110)
    while int(lengths.sum()) != total:
        i = int(torch.randint(num_dialogues, (1,), generator=gen))
        step = 1 if int(lengths.sum()) < total else -1
        if 10 <= int(lengths[i]) + step <= 110:
            lengths[i] += step
    return lengths


# ---- the vectorised eager baseline ------------------------------------------------------------------------------


@functools.cache
def _index_maps(lengths_key: tuple[int, ...], device: str) -> dict:
    """Index maps between the padded dialogues and the global node order, computed once per batch."""
    lengths = torch.tensor(lengths_key)
    G, l_max = len(lengths_key), max(lengths_key)
    N = int(lengths.sum())
    offsets = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(l_max)
    valid = pos[None, :] < lengths[:, None]  # [G, Lmax]
    utterance = torch.where(valid, offsets[:, None] + pos[None, :], 0)  # [G, Lmax]
    window = valid[:, :, None] & valid[:, None, :]  # [G, Lmax, Lmax]
    node = torch.arange(M_MODALITIES)[None, :, None] * N + utterance[:, None, :]  # [G, M, Lmax]
    target = torch.where(valid[:, None, :], node, M_MODALITIES * N).reshape(G, -1)  # padding -> dummy node
    return {
        key: value.to(device)
        for key, value in dict(utterance=utterance, valid=valid, window=window, target=target).items()
    } | {"l_max": l_max, "num_utterances": N}


def vectorized_eager(features: torch.Tensor, maps: dict, layout: str) -> torch.Tensor:
    M, N, _ = features.shape
    G, l_max = maps["valid"].shape
    valid = maps["valid"]
    unit = F.normalize(features, dim=-1)[:, maps["utterance"]] * valid[None, :, :, None]  # [M, G, Lmax, D]
    cos = unit @ unit.transpose(-1, -2)  # [M, G, Lmax, Lmax]: every intra-modality block in one batched matmul
    eye = torch.eye(l_max, dtype=torch.bool, device=features.device)
    self_weight = 1 - math.acos(SCALE) / math.pi  # the diagonal's exact value (the Gram's is 1 +- rounding)
    intra = torch.where(eye, self_weight, 1 - torch.acos((SCALE * cos).clamp(-1, 1)) / math.pi) * maps["window"]
    cross_cos = (unit[:, None] * unit[None]).sum(-1)  # [M, M, G, Lmax]
    cross = (1 - torch.acos((SCALE * cross_cos).clamp(-1, 1)) / math.pi) * valid
    # [G, M Lmax, M Lmax] by concatenation (no in-place writes for autograd to replay).
    rows = [
        torch.cat([intra[m] if n == m else torch.diag_embed(cross[m, n]) for n in range(M)], dim=-1) for m in range(M)
    ]
    blocks = torch.cat(rows, dim=-2)
    inv_sqrt = blocks.sum(-1).clamp_min(1e-12).rsqrt()  # padding rows: 0 * 1e6
    blocks = blocks * inv_sqrt[:, :, None] * inv_sqrt[:, None, :]
    if layout == "blocks":
        return blocks
    target = maps["target"]
    dense = features.new_zeros(M * N + 1, M * N + 1)
    dense = dense.index_put((target[:, :, None], target[:, None, :]), blocks)
    return dense[: M * N, : M * N]


@functools.cache
def _compiled(mode: str):
    return torch.compile(vectorized_eager, mode=mode, dynamic=False)


# ---- cases ----------------------------------------------------------------------------------------------------------


def impls_for(device: str, size: str, layout: str) -> tuple[str, ...]:
    impls = ("ours",)
    if device == "cpu" and size == "batch" and layout == "dense":
        impls += ("mmgcn-loop",)
    impls += ("eager", "compiled")
    return impls + (("compiled-max-autotune",) if device == "cuda" else ())


def _cases():
    devices = [("cpu", ()), ("cuda", (pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"),))]
    for device, device_marks in devices:
        for size in SIZES:
            for layout in LAYOUTS:
                for mode in MODES:
                    group = f"angular_adjacency/{device}/{size}/{layout}/{mode}"
                    for impl in impls_for(device, size, layout):
                        yield pytest.param(
                            device,
                            size,
                            layout,
                            mode,
                            impl,
                            marks=(pytest.mark.benchmark(group=group), *device_marks),
                            id=f"{device}-{size}-{layout}-{mode}-{impl}",
                        )


def make_inputs(size: str, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features [3, N, 200], lengths [G] on the CPU, cotangent seed): the same values for every implementation."""
    num_dialogues, total = SIZES[size]
    gen = torch.Generator().manual_seed(4321)
    features = torch.randn(M_MODALITIES, total, FEATURES, generator=gen).to(device)
    return features, dialogue_lengths(num_dialogues, total), gen


def _cotangent(shape, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(99)
    return torch.randn(shape, generator=gen).to(device)


@functools.cache
def _reference(size: str, device: str, layout: str, backward: bool):
    features, lengths, _ = make_inputs(size, "cpu")
    x = features.double().requires_grad_(backward)
    adjacency = angular_adjacency_ref(x, lengths, scale=SCALE, layout=layout)
    if not backward:
        return adjacency.detach(), None
    (grad,) = torch.autograd.grad(adjacency, x, _cotangent(adjacency.shape, "cpu").double())
    return adjacency.detach(), grad


def _check(size: str, device: str, layout: str, mode: str, impl: str, result) -> dict[str, float]:
    """Raise unless ``result`` matches the float64 reference; return the errors for ``extra_info``.

    The adjacency must agree to 1e-6 of its largest entry for ours (it measures ~3e-7), 1e-5 for the vectorised
    baselines and 1e-4 for the MMGCN-style loop, whose float32 self-loops go through arccos at the Gram's 1 +- 1e-7,
    where the slope is 224 (it measures ~2e-5). Gradients: 1e-4 of their largest entry for ours, 1e-3 for the
    baselines (all measure ~3e-7).
    """
    backward = mode == "fwd+bwd"
    ref_adj, ref_grad = _reference(size, device, layout, backward)
    adjacency, grad = result if backward else (result, None)
    adjacency = adjacency.detach().cpu().double()
    assert adjacency.shape == ref_adj.shape, f"{impl}: shape {tuple(adjacency.shape)} != {tuple(ref_adj.shape)}"
    scale = float(ref_adj.abs().max())
    adj_err = float((adjacency - ref_adj).abs().max()) / scale
    adj_tol = {"ours": 1e-6, "mmgcn-loop": 1e-4}.get(impl, 1e-5)
    assert adj_err < adj_tol, f"{impl} {size} {layout}: adjacency off by {adj_err:.2e}"
    errors = {"adjacency_err_rel_to_max": adj_err}
    if backward:
        grad = grad.cpu().double()
        g_err = float((grad - ref_grad).abs().max()) / float(ref_grad.abs().max())
        assert g_err < (1e-4 if impl == "ours" else 1e-3), f"{impl} {size} {layout}: gradient off by {g_err:.2e}"
        errors["grad_err_rel_to_max"] = g_err
    return errors


@pytest.fixture
def one_round(request: pytest.FixtureRequest):
    """For the MMGCN-style loop only (seconds per call): one timed round instead of --benchmark-min-rounds.
    Must come before ``run_benchmark`` in the test's arguments, which reads the option when it is set up."""
    option = request.config.option
    saved = getattr(option, "benchmark_min_rounds", None)
    if request.node.callspec.params.get("impl") == "mmgcn-loop":
        option.benchmark_min_rounds = 1
    yield
    option.benchmark_min_rounds = saved


@pytest.mark.parametrize(("device", "size", "layout", "mode", "impl"), list(_cases()))
def test_angular_adjacency(
    request, one_round, run_benchmark, device: str, size: str, layout: str, mode: str, impl: str
) -> None:
    if device == "cuda" and impl == "ours" and (reason := ours_cuda_skip_reason()):
        pytest.skip(reason)
    if impl == "mmgcn-loop" and request.config.getoption("benchmark_disable"):
        pytest.skip("the MMGCN-style loop takes 0.5 s (fwd) to 20 s (fwd+bwd) per call; it runs only when timing")
    dev = torch.device(device)
    backward = mode == "fwd+bwd"
    features, lengths, _ = make_inputs(size, device)
    x = features.detach().requires_grad_(backward)
    if impl == "ours":
        lengths_arg = lengths  # on the CPU: no device sync

        def fn():
            return angular_adjacency(x, lengths_arg, scale=SCALE, layout=layout)

    elif impl == "mmgcn-loop":

        def fn():
            return angular_adjacency_mmgcn_loop(x, lengths, scale=SCALE)

    else:
        maps = _index_maps(tuple(lengths.tolist()), device)
        impl_fn = vectorized_eager if impl == "eager" else _compiled(COMPILE_MODES[impl])

        def fn():
            return impl_fn(x, maps, layout)

    nbytes = None
    if backward:
        cot = None

        def step():
            nonlocal cot
            adjacency = fn()
            if cot is None:
                cot = _cotangent(adjacency.shape, device)
            (grad,) = torch.autograd.grad(adjacency, x, cot)
            sync(dev)
            return adjacency.detach(), grad

    else:

        def step():
            adjacency = fn()
            sync(dev)
            return adjacency

    warmup = 3 if impl.startswith("compiled") else (1 if impl == "mmgcn-loop" else 2)
    run_benchmark(
        step,
        impl=impl,
        device=dev,
        nbytes=nbytes,
        warmup=warmup,
        check=lambda result: _check(size, device, layout, mode, impl, result),
    )
