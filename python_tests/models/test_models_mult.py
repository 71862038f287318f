"""The MulT backbone and its transformer encoder (SPEC 1.1; combined dim anchor SPEC 8)."""

from __future__ import annotations

import math

import pytest
import torch

from mmer_ext.models.mult import MulT, TransformerEncoder, future_mask, sinusoidal_positions


def test_sinusoidal_positions_start_at_one():
    pe = sinusoidal_positions(5, 8)
    assert pe.shape == (5, 8)
    freqs = torch.exp(torch.arange(4) * -(math.log(10000.0) / 3))
    pos = torch.arange(1, 6).float()[:, None]
    torch.testing.assert_close(pe, torch.cat([(pos * freqs).sin(), (pos * freqs).cos()], 1))
    odd = sinusoidal_positions(3, 5)
    assert odd.shape == (3, 5) and torch.all(odd[:, -1] == 0)
    assert sinusoidal_positions(2, 2).shape == (2, 2)


def test_future_mask():
    assert torch.equal(future_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).triu(1))
    # Unequal lengths: MulT's offset 1 + |Lk - Lq|.
    m = future_mask(3, 5)
    assert torch.equal(m, torch.ones(3, 5, dtype=torch.bool).triu(3))
    assert not m[:, 0].any()


@pytest.mark.parametrize("cross", [False, True])
def test_causal_encoder_ignores_later_positions(cross):
    torch.manual_seed(0)
    enc = TransformerEncoder(8, 2, 2).eval()
    x, kv = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    base = enc(x, kv if cross else None)
    i = 3
    x2, kv2 = x.clone(), kv.clone()
    x2[:, i + 1:] += 5 * torch.randn(2, 6 - i - 1, 8)
    kv2[:, i + 1:] += 5 * torch.randn(2, 6 - i - 1, 8)
    out = enc(x2, kv2 if cross else None)
    torch.testing.assert_close(out[:, : i + 1], base[:, : i + 1])
    assert not torch.allclose(out[:, i + 1:], base[:, i + 1:])
    # Without the mask the early positions see the change.
    free = TransformerEncoder(8, 2, 2, attn_mask=False).eval()
    free.load_state_dict(enc.state_dict())
    assert not torch.allclose(free(x2, kv2 if cross else None)[:, :1], free(x, kv if cross else None)[:, :1])


def test_encoder_cross_lengths_and_errors():
    enc = TransformerEncoder(8, 3, 1)
    assert enc.num_heads == 2  # largest divisor of 8 not above 3
    assert enc(torch.randn(2, 4, 8), torch.randn(2, 7, 8)).shape == (2, 4, 8)
    with pytest.raises(ValueError, match="x must be"):
        enc(torch.randn(2, 4, 7))
    with pytest.raises(ValueError, match="kv must be"):
        enc(torch.randn(2, 4, 8), torch.randn(3, 4, 8))


def test_mult_default_anchor_shapes():
    # SPEC 8: combined dim 192 at d = 32, fusion output (B, 1).
    torch.manual_seed(0)
    net = MulT().eval()
    assert net.combined_dim == 192
    a, v, l = (torch.randn(2, 32, 48) for _ in range(3))
    assert net.features(a, v, l).shape == (2, 192)
    assert net(a, v, l).shape == (2, 1)
    assert sorted(net.cross) == ["AL", "AV", "LA", "LV", "VA", "VL"]
    assert all(len(net.cross[k].layers) == 4 for k in net.cross)
    # Memory encoders: width 2d, max(nlevels, 3) layers.
    assert all(len(net.mem[k].layers) == 4 and net.mem[k].embed_dim == 64 for k in net.mem)
    assert len(MulT(8, 2, 1).mem["A"].layers) == 3
    # The attention dropout follows the source modality (authors' get_network).
    assert net.cross["LA"].layers[0].attn.dropout == 0.2 and net.cross["VA"].layers[0].attn.dropout == 0.2
    assert net.cross["AV"].layers[0].attn.dropout == 0.0 and net.cross["AL"].layers[0].attn.dropout == 0.0


def test_mult_small_batch_one_and_determinism():
    torch.manual_seed(0)
    net = MulT(8, 2, 1, output_dim=3)
    a, v, l = torch.randn(1, 8, 5), torch.randn(1, 8, 5), torch.randn(1, 8, 5)
    net.eval()
    out = net(a, v, l)
    assert out.shape == (1, 3)
    assert torch.equal(out, net(a, v, l))
    net.train()
    torch.manual_seed(1)
    o1 = net(a, v, l)
    torch.manual_seed(1)
    assert torch.equal(o1, net(a, v, l))
    with pytest.raises(ValueError, match="A must be"):
        net(torch.randn(1, 7, 5), v, l)


def test_mult_uses_every_modality():
    torch.manual_seed(0)
    net = MulT(8, 2, 1).eval()
    a, v, l = (torch.randn(2, 8, 5) for _ in range(3))
    base = net(a, v, l)
    for k in range(3):
        xs = [a, v, l]
        xs[k] = xs[k] + torch.randn_like(xs[k])  # not a constant: LayerNorm removes per-step shifts
        assert not torch.allclose(net(*xs), base)
