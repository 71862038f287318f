"""Encoders and blocks of the MMIN family (mmer_ext.models.encoders): shapes, the MMIN / IF-MMIN authors' structure, padding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmer_ext.models.encoders import (
    FUSION_ORDER,
    FcClassifier,
    LSTMEncoder,
    ModalityEncoders,
    ResidualAE,
    ResidualXE,
    SharedEncoder,
    TextCNN,
    fuse,
    kaiming_init_,
)

B = 8




def _linears(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("method", ["maxpool", "last", "attention"])
def test_lstm_encoder_shape_and_padding_invariance(method):
    enc = LSTMEncoder(12, 16, method).eval()
    x = torch.randn(B, 9, 12)
    lengths = torch.tensor([9, 3, 5, 1, 9, 7, 2, 4])
    # Whatever sits in the padding must not matter when lengths are given.
    garbage = x.clone()
    for i, n in enumerate(lengths.tolist()):
        garbage[i, n:] = 100.0 * torch.randn(9 - n, 12)
    out = enc(x, lengths)
    assert out.shape == (B, 16)
    torch.testing.assert_close(enc(garbage, lengths), out)
    # ... and each row equals the utterance encoded alone, unpadded.
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(enc(x[i : i + 1, :n]), out[i : i + 1], atol=1e-6, rtol=1e-5)


def test_lstm_encoder_without_lengths_pools_over_padding_like_the_authors():
    enc = LSTMEncoder(12, 16).eval()
    x = torch.randn(2, 6, 12)
    x[1, 2:] = 0.0  # utterance 1 has 2 frames, zero-padded
    rnn_out, _ = enc.rnn(x)
    torch.testing.assert_close(enc(x), rnn_out.amax(1))
    torch.testing.assert_close(enc(x, torch.tensor([6, 2]))[1], rnn_out[1, :2].amax(0))


def test_lstm_encoder_rejects_unknown_pooling():
    with pytest.raises(ValueError):
        LSTMEncoder(4, 4, "mean")


def test_textcnn_shape_short_sequences_and_structure():
    enc = TextCNN(16, 128).eval()
    for steps in (1, 2, 4, 5, 11):
        out = enc(torch.randn(B, steps, 16))
        assert out.shape == (B, 128)
        assert (out >= 0).all()  # Linear + ReLU
    real = TextCNN()
    assert [c.kernel_size[0] for c in real.convs] == [3, 4, 5]
    assert all(c.in_channels == 1024 and c.out_channels == 128 for c in real.convs)
    assert _linears(real) == [(384, 128)]


def test_textcnn_lengths_ignore_padding():
    enc = TextCNN(16, 32).eval()
    x = torch.randn(4, 10, 16)
    lengths = torch.tensor([10, 6, 2, 5])
    garbage = x.clone()
    for i, n in enumerate(lengths.tolist()):
        garbage[i, n:] = 50.0
    out = enc(x, lengths)
    torch.testing.assert_close(enc(garbage, lengths), out)
    for i, n in enumerate(lengths.tolist()):
        alone = x[i : i + 1, :n]
        torch.testing.assert_close(enc(alone, torch.tensor([n])), out[i : i + 1], atol=1e-6, rtol=1e-5)
        if n >= 5:  # no window reaches past the end: the same as the authors' unmasked pooling
            torch.testing.assert_close(enc(alone), out[i : i + 1], atol=1e-6, rtol=1e-5)


def test_fc_classifier_layers_bn_and_hidden():
    clf = FcClassifier(320, (128, 128), 4, dropout=0.5)
    assert _linears(clf) == [(320, 128), (128, 128), (128, 4)]
    assert sum(isinstance(m, nn.Dropout) for m in clf.modules()) == 2
    assert not any(isinstance(m, nn.BatchNorm1d) for m in clf.modules())
    bn = FcClassifier(384, (128, 128), 4, dropout=0.1, use_bn=True)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in bn.modules()) == 2
    logits, hidden = clf.eval()(torch.randn(B, 320), return_hidden=True)
    assert logits.shape == (B, 4) and hidden.shape == (B, 128)
    assert FcClassifier(8, (), 3, dropout=0.0)(torch.randn(2, 8)).shape == (2, 3)


def test_residual_ae_structure_spec_1_3():
    ae = ResidualAE((256, 128, 64), 5, 384)
    assert ae.latent_dim == 320 and len(ae.encoders) == len(ae.decoders) == 5
    for enc, dec in zip(ae.encoders, ae.decoders):
        assert [type(m) for m in enc] == [nn.Linear, nn.LeakyReLU, nn.Linear, nn.LeakyReLU, nn.Linear]
        assert _linears(enc) == [(384, 256), (256, 128), (128, 64)]
        assert [type(m) for m in dec] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
        assert _linears(dec) == [(64, 128), (128, 256), (256, 384)]
    assert [type(m) for m in ae.transition] == [nn.Linear, nn.ReLU, nn.Linear]
    assert _linears(ae.transition) == [(384, 384), (384, 384)]
    recon, latent = ae(torch.randn(B, 384))
    assert recon.shape == (B, 384) and latent.shape == (B, 320)


def test_residual_ae_forward_matches_hand_computation():
    ae = ResidualAE((8, 6, 4), 3, 10)
    x = torch.randn(B, 10)
    x_in, x_out, lat = x, torch.zeros_like(x), []
    for i in range(3):
        x_in = x_in + x_out
        lat.append(ae.encoders[i](x_in))
        x_out = ae.decoders[i](lat[-1])
    recon, latent = ae(x)
    torch.testing.assert_close(recon, ae.transition(x_in + x_out))
    torch.testing.assert_close(latent, torch.cat(lat, 1))
    # Unrolled by hand for the first two blocks: block 2 sees x + dec_1(enc_1(x)).
    first = ae.decoders[0](ae.encoders[0](x))
    torch.testing.assert_close(latent[:, 4:8], ae.encoders[1](x + first))


def test_residual_xe_forward_matches_spec_1_4():
    xe = ResidualXE((8, 6, 4), 3, 10)
    x, s = torch.randn(B, 10), torch.randn(B, 10)
    x_out, lat = x, []
    for i in range(3):
        lat.append(xe.encoders[i](x_out + s))
        x_out = xe.decoders[i](lat[-1])
    recon, latent = xe(x, s)
    torch.testing.assert_close(recon, xe.transition(x_out))
    torch.testing.assert_close(latent, torch.cat(lat, 1))
    with pytest.raises(ValueError):
        xe(x, s[:, :5])
    real_recon, real_latent = ResidualXE()(torch.randn(2, 384), torch.randn(2, 384))
    assert real_recon.shape == (2, 384) and real_latent.shape == (2, 320)


def test_shared_encoder_structure():
    shared = SharedEncoder(128)
    assert [type(m) for m in shared.net] == [nn.Linear, nn.LeakyReLU, nn.Linear, nn.LeakyReLU]
    assert _linears(shared) == [(128, 128), (128, 128)]
    assert shared(torch.randn(B, 128)).shape == (B, 128)


def test_modality_encoders_real_dims_and_fusion_order():
    enc = ModalityEncoders((130, 342, 1024)).eval()
    assert enc.A.rnn.input_size == 130 and enc.V.rnn.input_size == 342 and enc.L.input_size == 1024
    assert enc.fused_dim == 384
    feats = enc(torch.randn(2, 4, 130), torch.randn(2, 3, 342), torch.randn(2, 6, 1024))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {"A": (2, 128), "V": (2, 128), "L": (2, 128)}
    assert FUSION_ORDER == ("A", "L", "V")
    fused = fuse(feats)
    assert fused.shape == (2, 384)
    torch.testing.assert_close(fused, torch.cat([feats["A"], feats["L"], feats["V"]], 1))


def test_modality_encoders_lengths_columns_and_switch():
    x = {"A": torch.randn(B, 7, 12), "V": torch.randn(B, 5, 10), "L": torch.randn(B, 6, 16)}
    lengths = torch.tensor([[7, 5, 6], [3, 2, 4]] * 4)
    enc = ModalityEncoders({"A": 12, "V": 10, "L": 16}, 16).eval()
    feats = enc(x["A"], x["V"], x["L"], lengths)
    torch.testing.assert_close(feats["A"], enc.A(x["A"], lengths[:, 0]))
    torch.testing.assert_close(feats["V"], enc.V(x["V"], lengths[:, 1]))
    torch.testing.assert_close(feats["L"], enc.L(x["L"], lengths[:, 2]))
    enc.use_lengths = False
    torch.testing.assert_close(enc(x["A"], x["V"], x["L"], lengths)["A"], enc.A(x["A"]))


def test_kaiming_init_linear_conv_bias_zero_lstm_untouched():
    model = nn.ModuleDict({"lin": nn.Linear(400, 300), "cnn": TextCNN(64, 8), "lstm": nn.LSTM(5, 7),
                           "bn": nn.BatchNorm1d(6)})
    lstm_before = {k: v.clone() for k, v in model["lstm"].state_dict().items()}
    kaiming_init_(model)
    assert torch.all(model["lin"].bias == 0)
    assert model["lin"].weight.std().item() == pytest.approx(math.sqrt(2 / 400), rel=0.05)
    for conv in model["cnn"].convs:
        assert torch.all(conv.bias == 0)
    assert model["cnn"].convs[0].weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 3)), rel=0.1)
    for k, v in model["lstm"].state_dict().items():
        assert torch.equal(v, lstm_before[k])
    assert torch.all(model["bn"].bias == 0)
