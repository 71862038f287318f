"""The MulT backbone and its transformer encoder (IMDer, Wang et al., NeurIPS 2023; github.com/mdswyz/IMDer; its combined dim as an anchor)."""

from __future__ import annotations

import math

import pytest
import torch

from mmer_ext.models.mult import MulT, TransformerEncoder, attend, future_mask, sinusoidal_positions


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
    # IMDer's code: combined dim 192 at d = 32, fusion output (B, 1).
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


# ---------------------------------------------------------------------------------------------------------------------
# fidelity to the authors' MulT (trains/subNets/transformers_encoder, trains/singleTask/model/imder.py)


def test_memory_encoders_take_the_authors_order():
    # L from [L<-A, L<-V], A from [A<-L, A<-V], V from [V<-L, V<-A]: the memory encoder adds positions over the
    # concatenated channels, so the order is part of the function, not a relabelling.
    from mmer_ext.models.mult import MEM_SOURCES

    assert MEM_SOURCES == {"L": ("A", "V"), "A": ("L", "V"), "V": ("L", "A")}
    torch.manual_seed(0)
    net = MulT(8, 2, 1).eval()
    seqs = {m: torch.randn(2, 8, 5) for m in "AVL"}
    seen = {}
    hooks = [net.mem[m].register_forward_pre_hook(lambda mod, args, m=m: seen.setdefault(m, args[0]))
             for m in "AVL"]
    net(seqs["A"], seqs["V"], seqs["L"])
    for h in hooks:
        h.remove()
    t = {m: s.transpose(1, 2) for m, s in seqs.items()}
    for m, (o1, o2) in MEM_SOURCES.items():
        want = torch.cat([net.cross[m + o1](t[m], t[o1]), net.cross[m + o2](t[m], t[o2])], dim=2)
        torch.testing.assert_close(seen[m], want)
    # the reversed order would give a different output (positions over the channels)
    mem = net.mem["A"]
    swapped = torch.cat([seen["A"][..., 8:], seen["A"][..., :8]], dim=2)
    assert not torch.allclose(mem(seen["A"]), mem(swapped))


@pytest.mark.parametrize("dim", [32, 64])
def test_attention_output_projection_has_xavier_init(dim):
    torch.manual_seed(0)
    enc = TransformerEncoder(dim, 8, 2)
    for layer in enc.layers:
        w, b = layer.attn.out_proj.weight.detach(), layer.attn.out_proj.bias.detach()
        bound = math.sqrt(6 / (2 * dim))  # Xavier-uniform; Linear's default would be 1 / sqrt(dim)
        assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound
        assert abs(float(w.var()) / (bound**2 / 3) - 1) < 0.15
        assert bool((b == 0).all())


def test_keys_and_values_get_their_own_embedding_dropout(monkeypatch):
    from mmer_ext.models import mult

    torch.manual_seed(0)
    enc = TransformerEncoder(8, 2, 1, embed_dropout=0.5)
    seen = []

    def spy(attn, q, k, v, *args):
        seen.append((k, v))
        return attend(attn, q, k, v, *args)

    monkeypatch.setattr(mult, "attend", spy)
    x, kv = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    enc.train()(x, kv)
    k, v = seen[-1]
    assert not torch.equal(k, v)  # two masks (the same mask would give the same normalised tensor)
    enc.eval()(x, kv)
    k, v = seen[-1]
    assert torch.equal(k, v)
    # without embedding dropout nothing is drawn twice: training equals evaluation
    enc0 = TransformerEncoder(8, 2, 1)
    torch.testing.assert_close(enc0.train()(x, kv), enc0.eval()(x, kv))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["self", "cross-shared", "cross-separate"])
@pytest.mark.parametrize("lengths", [(6, 6), (4, 7), (1, 1), (7, 3)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("embed", "heads"), [(8, 4), (32, 2)], ids=["narrow-heads", "wide-heads"])
def test_attend_is_the_module_forward_and_backward(dtype, kind, lengths, masked, embed, heads):
    """attend() reads the module's weights and gives its output and gradients (dropout 0; the causal flag on the
    square case must equal the explicit mask), through the attention op (heads of width 2) and SDPA (width 16)."""
    torch.manual_seed(1)
    lq, lk = lengths
    if kind == "self":
        lk = lq
    mha = torch.nn.MultiheadAttention(embed, heads, batch_first=True).to(dtype)
    x = torch.randn(3, lq, embed, dtype=dtype, requires_grad=True)
    kv = x if kind == "self" else torch.randn(3, lk, embed, dtype=dtype, requires_grad=True)
    v = kv if kind != "cross-separate" else torch.randn(3, lk, embed, dtype=dtype, requires_grad=True)
    mask = future_mask(lq, lk) if masked else None
    inputs = [x] + ([kv] if kv is not x else []) + ([v] if v is not kv else [])
    ref = mha(x, kv, v, attn_mask=mask, need_weights=False)[0]
    ours = attend(mha, x, kv, v, mask, training=True, causal=masked and lq == lk)
    torch.testing.assert_close(ours, ref)
    g = torch.randn_like(ref)
    params = list(mha.parameters())
    torch.testing.assert_close(torch.autograd.grad(ours, inputs + params, g),
                               torch.autograd.grad(ref, inputs + params, g))


def test_attend_dropout_drops_attention_weights_in_training_only():
    torch.manual_seed(2)
    mha = torch.nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True)
    x = torch.randn(4, 10, 8)
    mask = future_mask(10, 10)
    mha.eval()
    clean = mha(x, x, x, attn_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(attend(mha, x, x, x, mask, training=False, causal=True), clean)
    a, b = (attend(mha, x, x, x, mask, training=True, causal=True) for _ in range(2))
    assert not torch.allclose(a, b) and not torch.allclose(a, clean)
    # Inverted dropout keeps the expectation: the mean over many draws approaches the clean output.
    mean = torch.stack([attend(mha, x, x, x, mask, training=True, causal=True) for _ in range(400)]).mean(0)
    assert (mean - clean).abs().mean() < 0.1 * clean.abs().mean()
    assert torch.isfinite(a).all()
