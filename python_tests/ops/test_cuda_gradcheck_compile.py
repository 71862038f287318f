"""float64 gradcheck and ``torch.compile(fullgraph=True)`` of every op family on a CUDA device.

The op test files run gradcheck and the compile tests on the CPU kernels; on CUDA they compare values and gradients
with the references. These tests close that gap for the GPU check (``make gpu-check``): finite differences against
the CUDA backward kernels, and Inductor-compiled graphs around the CUDA kernels matching eager. Small shapes: every
gradcheck evaluation is a handful of launches. All of them skip without a GPU.
"""

from __future__ import annotations

import pytest
import torch

import mmer_ext  # noqa: F401  (loads the compiled library)
from mmer_ext.ops import (
    angular_adjacency,
    block_graph_propagate,
    central_moments,
    cmd,
    cmd_pairwise,
    ddim_step,
    langevin_corrector_step,
    ve_ode_step,
    ve_perturb,
    ve_sde_em_step,
)
from op_testing import CUDA_ONLY  # noqa: E402  (this folder, put on sys.path by pytest)

pytestmark = CUDA_ONLY

SIGMA = 25.0
DT = 0.05


def _randn(*shape, dtype=torch.float64, seed=0, scale=1.0, shift=0.0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift
    return x.to(device="cuda", dtype=dtype).requires_grad_(requires_grad)


def _lengths(values):
    return torch.tensor(values, dtype=torch.long)


# ---- gradcheck (float64, finite differences against the CUDA backward kernels) ------------------------------------


@pytest.mark.parametrize("n_moments", [1, 3, 5])
def test_gradcheck_cmd_family_cuda(n_moments):
    # Distinct location and spread per input, so no two central moments coincide (the CMD norm's kink).
    a = _randn(6, 4, seed=1)
    b = _randn(5, 4, seed=2, scale=1.5, shift=0.5)
    c = _randn(7, 4, seed=3, scale=0.7, shift=-0.3)
    assert torch.autograd.gradcheck(lambda v: central_moments(v, n_moments), (a,))
    assert torch.autograd.gradcheck(lambda u, v: cmd(u, v, n_moments), (a, b))
    assert torch.autograd.gradcheck(lambda *v: cmd_pairwise(list(v), n_moments), (a, b, c))


@pytest.mark.parametrize("window", [None, 1])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
@pytest.mark.parametrize("layout", ["dense", "blocks"])
def test_gradcheck_angular_adjacency_cuda(layout, normalize, window):
    x = _randn(3, 8, 4)  # [M, N, D]: three modalities, dialogues of 3, 1 and 4 utterances
    lengths = _lengths([3, 1, 4])
    assert torch.autograd.gradcheck(
        lambda v: angular_adjacency(v, lengths, layout=layout, normalize=normalize, window=window), (x,)
    )


def test_gradcheck_through_block_graph_propagate_cuda():
    x = _randn(2, 5, 4)
    lengths = _lengths([2, 3])
    h = _randn(10, 3, seed=4)
    assert torch.autograd.gradcheck(
        lambda v, w: block_graph_propagate(angular_adjacency(v, lengths, layout="blocks"), w, lengths), (x, h)
    )


STEP_OPS = ["ve_perturb", "ve_sde_em_step", "ve_ode_step", "langevin_corrector_step", "ddim_step"]


def _step_cases():
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64, device="cuda")
    ab_t = torch.tensor([0.15, 0.3, 0.45], dtype=torch.float64, device="cuda")
    return {
        "ve_perturb": (lambda x, s, z: ve_perturb(x, t, SIGMA, noise=z), (0, 2)),
        "ve_sde_em_step": (lambda x, s, z: ve_sde_em_step(x, s, t, DT, SIGMA, noise=z), (0, 1, 2)),
        "ve_ode_step": (lambda x, s, z: ve_ode_step(x, s, t, DT, SIGMA), (0, 1)),
        "langevin_corrector_step": (lambda x, s, z: langevin_corrector_step(x, s, 0.3, noise=z), (0, 1, 2)),
        "ddim_step": (lambda x, s, z: ddim_step(x, s, ab_t, 0.8, 0.6, noise=z), (0, 1, 2)),
    }


@pytest.mark.parametrize("name", STEP_OPS)
def test_gradcheck_step_ops_cuda(name):
    fn, used = _step_cases()[name]
    full = [_randn(3, 2, 5, seed=i) for i in range(3)]

    def f(*args):
        inputs = list(full)
        for i, v in zip(used, args):
            inputs[i] = v
        return fn(*inputs)

    assert torch.autograd.gradcheck(f, tuple(full[i] for i in used))


def test_gradcheck_langevin_in_kernel_noise_cuda():
    # A fresh generator with a fixed seed makes the Philox noise, and so the op, a deterministic function.
    x, s = _randn(3, 7, seed=5), _randn(3, 7, seed=6)
    assert torch.autograd.gradcheck(
        lambda a, b: langevin_corrector_step(a, b, 0.3, generator=torch.Generator("cuda").manual_seed(5)), (x, s)
    )


# ---- torch.compile(fullgraph=True) with Inductor around the CUDA kernels ------------------------------------------


def _all_ops(a, b, c, feats, lengths, h, x, s, t):
    loss = (central_moments(a, 3).sum() + cmd(a, b, 4) + cmd_pairwise([a, b, c], 5))
    dense = angular_adjacency(feats, lengths, window=2)
    blocks = angular_adjacency(feats, lengths, layout="blocks")
    loss = loss + dense.square().sum() + block_graph_propagate(blocks, h, lengths).square().sum()
    nxt, mean = ve_sde_em_step(x, s, t, DT, SIGMA, noise=s)
    return loss + nxt.square().sum() + mean.sum() + ve_ode_step(x, s, t, DT, SIGMA).sum()


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_inductor_fullgraph_cuda():
    lengths = _lengths([3, 1, 5, 2])
    args = [
        _randn(9, 6, dtype=torch.float32, seed=1),
        _randn(7, 6, dtype=torch.float32, seed=2, scale=1.5, shift=0.5),
        _randn(8, 6, dtype=torch.float32, seed=3, scale=0.7, shift=-0.3),
        _randn(3, 11, 17, dtype=torch.float32, seed=4),
        lengths,
        _randn(33, 4, dtype=torch.float32, seed=5),
        _randn(4, 32, 48, dtype=torch.float32, seed=6),
        _randn(4, 32, 48, dtype=torch.float32, seed=7),
        torch.tensor([0.1, 0.3, 0.6, 0.9], device="cuda"),
    ]
    grad_idx = [0, 1, 2, 3, 5, 6, 7]
    compiled = torch.compile(_all_ops, fullgraph=True)
    out = compiled(*args)
    grads = torch.autograd.grad(out, [args[i] for i in grad_idx])
    eager_args = [a.detach().clone().requires_grad_(a.requires_grad) if a.is_floating_point() else a for a in args]
    expected = _all_ops(*eager_args)
    expected_grads = torch.autograd.grad(expected, [eager_args[i] for i in grad_idx])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
