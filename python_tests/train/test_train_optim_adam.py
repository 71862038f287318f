"""``mmer_ext.train.optim.adam``: fused where the parameters allow it, the same update as the default Adam."""

from __future__ import annotations

import torch

from mmer_ext.train.optim import adam


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=g, dtype=dtype)),
            torch.nn.Parameter(torch.randn(7, generator=g, dtype=dtype))]


def test_fused_on_cpu_floats_and_same_steps_as_the_default():
    ours, plain = _params(), _params()
    opt = adam(ours, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)
    ref = torch.optim.Adam(plain, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)
    assert opt.defaults["fused"] is True and not ref.defaults["fused"]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for p, q, gr in zip(ours, plain, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, plain):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    # the state dict has the default optimiser's layout, so checkpoints load either way
    ref.load_state_dict(opt.state_dict())


def test_not_fused_where_it_cannot_be():
    mixed = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, device="meta"))]
    assert not adam(mixed, lr=0.1).defaults["fused"]
