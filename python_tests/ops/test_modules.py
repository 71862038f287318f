"""The ``nn.Module`` forms of the ops: the same results and gradients as the functional ops, no state, options checked
at construction, ``torch.compile(fullgraph=True)``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mmer_ext  # noqa: F401  (loads the compiled library)
from mmer_ext.ops import (
    AngularAdjacency,
    BlockGraphPropagate,
    CMDLoss,
    angular_adjacency,
    block_graph_propagate,
    cmd,
    cmd_pairwise,
)


def _features(requires_grad: bool = False):
    lengths = torch.tensor([3, 1, 4])
    x = torch.randn(3, 8, 5, dtype=torch.float64, requires_grad=requires_grad)
    return x, lengths


def test_cmd_loss_two_inputs_is_cmd():
    a = torch.randn(16, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    loss = CMDLoss(n_moments=3)(a, b)
    expected = cmd(a, b, 3)
    assert torch.equal(loss, expected)
    got = torch.autograd.grad(loss, (a, b))
    want = torch.autograd.grad(expected, (a, b))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_cmd_loss_more_inputs_is_cmd_pairwise():
    xs = [torch.randn(10, 4, dtype=torch.float64) for _ in range(3)]
    expected = cmd_pairwise(xs, 5)
    loss = CMDLoss()
    assert torch.equal(loss(*xs), expected)
    assert torch.equal(loss(xs), expected)
    assert torch.equal(loss(torch.stack(xs)), expected)
    assert not torch.equal(loss(xs[0], xs[1]), expected)  # two inputs really take the two-input path


def test_angular_adjacency_module_matches_the_op():
    x, lengths = _features(requires_grad=True)
    for options in ({}, {"scale": 1.0, "normalize": False}, {"window": 1}, {"layout": "blocks"}):
        module = AngularAdjacency(**options)
        out = module(x, lengths)
        expected = angular_adjacency(x, lengths, **options)
        assert torch.equal(out, expected), options
        (g,) = torch.autograd.grad(out.square().sum(), x)
        (w,) = torch.autograd.grad(expected.square().sum(), x)
        assert torch.equal(g, w), options


def test_block_graph_propagate_module_matches_the_op():
    x, lengths = _features()
    blocks = AngularAdjacency(layout="blocks")(x, lengths)
    h = torch.randn(3 * 8, 2, dtype=torch.float64)
    out = BlockGraphPropagate(3)(blocks, h, lengths)
    assert torch.equal(out, block_graph_propagate(blocks, h, lengths, 3))
    torch.testing.assert_close(out, angular_adjacency(x, lengths) @ h)


@pytest.mark.parametrize("module", [CMDLoss(), AngularAdjacency(), BlockGraphPropagate(3)],
                         ids=lambda m: type(m).__name__)
def test_modules_hold_no_state(module):
    assert module.state_dict() == {}
    assert list(module.parameters()) == [] and list(module.buffers()) == []
    module.load_state_dict({})  # a model that contains one still loads its checkpoints


def test_reprs_show_the_options():
    assert repr(CMDLoss(3)) == "CMDLoss(n_moments=3)"
    assert repr(AngularAdjacency(window=2, layout="blocks")) == (
        "AngularAdjacency(scale=0.99999, normalize=True, window=2, layout='blocks')")
    assert repr(BlockGraphPropagate(3)) == "BlockGraphPropagate(num_modalities=3)"


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: CMDLoss(0), "n_moments"),
        (lambda: CMDLoss(2.0), "n_moments"),
        (lambda: CMDLoss(True), "n_moments"),
        (lambda: AngularAdjacency(scale=0.0), "scale"),
        (lambda: AngularAdjacency(scale=1.5), "scale"),
        (lambda: AngularAdjacency(scale="1"), "scale"),
        (lambda: AngularAdjacency(normalize=1), "normalize"),
        (lambda: AngularAdjacency(window=-1), "window"),
        (lambda: AngularAdjacency(window=1.5), "window"),
        (lambda: AngularAdjacency(layout="sparse"), "layout"),
        (lambda: BlockGraphPropagate(0), "num_modalities"),
        (lambda: BlockGraphPropagate(2.0), "num_modalities"),
    ],
)
def test_bad_options_fail_at_construction(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


def test_cmd_loss_needs_inputs():
    with pytest.raises(TypeError, match="CMDLoss"):
        CMDLoss()()


class _Invariant(nn.Module):
    """IF-MMIN's pattern: shared encoders, then the pairwise CMD of their outputs."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(6, 4)
        self.cmd = CMDLoss()
        self.graph = AngularAdjacency(layout="blocks")
        self.propagate = BlockGraphPropagate(3)

    def forward(self, a, v, l, lengths):
        s = [self.shared(t) for t in (a, v, l)]
        feats = torch.stack(s)
        h = self.propagate(self.graph(feats, lengths), feats.reshape(-1, 4), lengths)
        return self.cmd(*s) + h.square().mean()


def test_modules_compile_fullgraph(fresh_dynamo):
    model = _Invariant()
    lengths = torch.tensor([2, 3])
    inputs = [torch.randn(5, 6, requires_grad=True) for _ in range(3)]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs, lengths)
    expected = model(*inputs, lengths)
    torch.testing.assert_close(out, expected)
    got = torch.autograd.grad(out, inputs)
    want = torch.autograd.grad(expected, inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
