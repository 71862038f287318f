"""IMDer's score network and denoising-score-matching loss (IMDer, Wang et al., NeurIPS 2023; github.com/mdswyz/IMDer; anchors computed from its code)."""

from __future__ import annotations

import math

import pytest
import torch

from mmer_ext.models.score_net import GaussianFourierProjection, ScoreNet, dsm_loss

SMALL = dict(widths=(8, 16, 32, 32), embed_dim=16)


def _std(t, sigma=25.0):
    return torch.sqrt((sigma ** (2 * t.double()) - 1) / (2 * math.log(sigma))).float()


def test_fourier_projection_is_a_fixed_buffer():
    torch.manual_seed(0)
    proj = GaussianFourierProjection(16, scale=30.0)
    assert [n for n, _ in proj.named_buffers()] == ["W"] and not list(proj.parameters())
    t = torch.tensor([0.0, 0.25, 1.0])
    out = proj(t)
    assert out.shape == (3, 16)
    angles = t[:, None] * proj.W[None] * 2 * math.pi
    torch.testing.assert_close(out, torch.cat([angles.sin(), angles.cos()], 1))
    with pytest.raises(ValueError, match="embed_dim"):
        GaussianFourierProjection(7)


def test_default_scorenet_shape_anchor():
    # IMDer's code: ScoreNet(x (B,32,48), t (B,), c (B,32,48)) -> (B,32,48); levels 48 -> 24 -> 12 -> 6.
    torch.manual_seed(0)
    net = ScoreNet(32, 48, 32)
    assert net.widths == (32, 64, 128, 256)
    x, c = torch.randn(2, 32, 48), torch.randn(2, 32, 48)
    lengths = []
    hooks = [lvl.conv.register_forward_hook(lambda m, i, o: lengths.append(o.shape[-1])) for lvl in net.down]
    out = net(x, torch.tensor([0.3, 0.9]), c)
    for h in hooks:
        h.remove()
    assert out.shape == (2, 32, 48) and torch.isfinite(out).all()
    assert lengths == [48, 24, 12, 6]
    # GroupNorm: 4 groups at the first level, 32 elsewhere.
    assert [lvl.norm.num_groups for lvl in net.down] == [4, 32, 32, 32]
    assert [lvl.norm.num_groups for lvl in net.up] == [32, 32, 32]
    assert net.out.norm is None and net.out.dense is None
    with pytest.raises(ValueError, match="length"):
        net(torch.randn(1, 32, 40), torch.rand(1), torch.randn(1, 32, 40))


@pytest.mark.parametrize("b,length", [(1, 10), (3, 11), (2, 1), (2, 48)])
def test_small_scorenet_shapes(b, length):
    torch.manual_seed(0)
    net = ScoreNet(8, None, 8, **SMALL)
    x, c = torch.randn(b, 8, length), torch.randn(b, 8, length)
    assert net(x, torch.rand(b), c).shape == (b, 8, length)
    assert net(x, 0.5, None).shape == (b, 8, length)  # scalar t, unconditional


def test_small_config_clamps_groups_and_heads():
    net = ScoreNet(8, None, 8, widths=(8, 16, 32, 48), num_heads=8, embed_dim=16)
    assert [lvl.norm.num_groups for lvl in net.down] == [4, 16, 32, 16]
    assert all(lvl.attn.embed_dim % lvl.attn.num_heads == 0 for lvl in [*net.down, *net.up, net.out])
    odd = ScoreNet(6, None, 6, widths=(6, 12), num_heads=8, embed_dim=16)
    assert odd.down[0].attn.num_heads == 6
    assert odd(torch.randn(2, 6, 8), torch.rand(2), torch.randn(2, 6, 8)).shape == (2, 6, 8)


def test_condition_channels_other_than_first_width_are_mapped():
    net = ScoreNet(8, None, 5, **SMALL)
    assert isinstance(net.down[0].cond_conv, torch.nn.Conv1d)
    assert net(torch.randn(2, 8, 12), torch.rand(2), torch.randn(2, 5, 12)).shape == (2, 8, 12)


def test_output_is_divided_by_marginal_std():
    torch.manual_seed(0)
    net = ScoreNet(8, None, 8, **SMALL)
    x, c = torch.randn(2, 8, 12), torch.randn(2, 8, 12)
    t = torch.tensor([0.2, 0.7])
    raw = []
    net.out.register_forward_hook(lambda m, i, o: raw.append(o[0]))
    out = net(x, t, c)
    torch.testing.assert_close(out, raw[0] / _std(t).view(2, 1, 1))
    torch.testing.assert_close(net.marginal_std(torch.tensor(1.0)), torch.tensor(9.8452), atol=1e-4, rtol=0)


def test_scorenet_uses_the_condition_and_time():
    torch.manual_seed(0)
    net = ScoreNet(8, None, 8, **SMALL)
    x, c = torch.randn(2, 8, 12), torch.randn(2, 8, 12)
    t = torch.full((2,), 0.5)
    base = net(x, t, c)
    assert not torch.allclose(base, net(x, t, c + 1))
    assert not torch.allclose(base * _std(t).view(2, 1, 1),
                              net(x, t + 0.1, c) * _std(t + 0.1).view(2, 1, 1))


def test_scorenet_bad_inputs():
    net = ScoreNet(8, None, 8, **SMALL)
    x = torch.randn(2, 8, 12)
    with pytest.raises(ValueError, match="x must be"):
        net(torch.randn(2, 7, 12), torch.rand(2), x)
    with pytest.raises(ValueError, match="cond must be"):
        net(x, torch.rand(2), torch.randn(2, 8, 11))
    with pytest.raises(ValueError, match="t must be"):
        net(x, torch.rand(3), x)
    with pytest.raises(ValueError, match="widths"):
        ScoreNet(8, widths=(8,))
    with pytest.raises(ValueError, match="sigma"):
        ScoreNet(8, sigma=1.0)


def test_dsm_loss_matches_its_definition():
    # t ~ U(eps, 1) then z ~ N(0, I) from the generator; x and cond perturbed with the same z.
    torch.manual_seed(0)
    net = ScoreNet(8, None, 8, **SMALL)
    x, c = torch.randn(3, 8, 12), torch.randn(3, 8, 12)
    loss = dsm_loss(net, x, c, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t = torch.rand(3, generator=g) * (1 - 1e-5) + 1e-5
    z = torch.randn(3, 8, 12, generator=g)
    std = _std(t).view(3, 1, 1)
    s = net(x + std * z, t, c + std * z)
    expected = ((s * std + z) ** 2).sum(dim=(1, 2)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    again = dsm_loss(net, x, c, generator=torch.Generator().manual_seed(7))
    assert torch.equal(loss, again)


def test_dsm_loss_gradients_reach_net_and_condition():
    torch.manual_seed(0)
    net = ScoreNet(8, None, 8, **SMALL)
    c = torch.randn(2, 8, 12, requires_grad=True)
    dsm_loss(net, torch.randn(2, 8, 12), c).backward()
    assert c.grad is not None and c.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError, match="cond must have"):
        dsm_loss(net, torch.randn(2, 8, 12), torch.randn(2, 8, 10))
    with pytest.raises(ValueError, match="non-empty"):
        dsm_loss(net, torch.randn(0, 8, 12), None)


def test_dsm_loss_decreases_on_a_toy_set():
    torch.manual_seed(0)
    net = ScoreNet(4, None, 4, widths=(8, 16), embed_dim=16, num_heads=2, num_layers=1)
    # x is a fixed function of the condition, so the conditional score is learnable.
    c = torch.randn(16, 4, 8)
    x = 0.5 * c.flip(-1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def evaluate():
        with torch.no_grad():
            return dsm_loss(net, x, c, generator=torch.Generator().manual_seed(123)).item()

    before = evaluate()
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        loss = dsm_loss(net, x, c, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate()
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("mode", ["shared", "independent", "clean"])
def test_dsm_condition_noise_modes(mode):
    # A spy net records what it is fed: with the authors' shared noise the condition moves with the sample
    # (c_t - x_t == c - x at every t); with independent noise it does not; clean passes the condition itself.
    seen = {}

    def spy(x_t, t, c_t):
        seen["x_t"], seen["c_t"] = x_t, c_t
        return torch.zeros_like(x_t)

    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(4, 3, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    dsm_loss(spy, x, c, generator=torch.Generator().manual_seed(1), condition_noise=mode)
    same_offset = torch.allclose(seen["c_t"] - seen["x_t"], c - x, atol=1e-4)
    assert same_offset == (mode == "shared")
    assert torch.equal(seen["c_t"], c) == (mode == "clean")
    if mode == "independent":
        # its own noise, at the sample's std(t): (c_t - c) / (x_t - x) is not 1 and the noises are uncorrelated
        zc, zx = (seen["c_t"] - c).flatten(), (seen["x_t"] - x).flatten()
        assert abs(float(torch.corrcoef(torch.stack([zc, zx]))[0, 1])) < 0.3


def test_dsm_default_is_the_authors_shared_noise():
    seen = {}

    def spy(x_t, t, c_t):
        seen["x_t"], seen["c_t"] = x_t, c_t
        return torch.zeros_like(x_t)

    x, c = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    dsm_loss(spy, x, c, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(seen["c_t"] - seen["x_t"], c - x, atol=1e-4, rtol=0)


def test_dsm_condition_noise_is_checked():
    with pytest.raises(ValueError, match="condition_noise"):
        dsm_loss(lambda x, t, c: x, torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), condition_noise="fresh")
