"""NMER: teacher (utt_shared_002), conditional VAE and student (NMER, arXiv 2311.16114; github.com/WooyoohL/Noise-robust_MER)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from mmer_ext.data.utterance import ModalityDims
from mmer_ext.models.encoders import FUSION_ORDER, fuse
from mmer_ext.models.nmer import NMER, ConditionVAE, NMERTeacher, gaussian_kl
from mmer_ext.ops._reference import cmd_pairwise_ref

DIMS = ModalityDims(12, 10, 16)
C = 4
B = 8
T = 7




def make_batch(b: int = B, dims: ModalityDims = DIMS, t: int = T, seed: int = 1) -> dict[str, torch.Tensor]:
    """A collated + gaussian-corrupted batch built by hand: noisy "A"/"V"/"L", clean "*_clean"."""
    g = torch.Generator().manual_seed(seed)
    batch: dict[str, torch.Tensor] = {}
    for m in ("A", "V", "L"):
        clean = torch.randn(b, t, getattr(dims, m), generator=g)
        batch[f"{m}_clean"] = clean
        batch[m] = 0.6 * clean + 0.8 * torch.randn(clean.shape, generator=g)
    batch["missing_index"] = torch.randint(0, 2, (b, 3), generator=g)
    batch["label"] = torch.randint(0, C, (b,), generator=g)
    lengths = torch.randint(3, t + 1, (b, 3), generator=g)
    lengths[0] = t
    batch["lengths"] = lengths
    return batch


#: Narrow encoders (fused 3 x 32 = 96, CVAE d_model 192) for the tests that are not about the authors' sizes: a 2-core
#: CPU runs them several times faster than the 768-wide CVAE.
SMALL = {"hidden": 32}


def make_teacher(**hp) -> NMERTeacher:
    return NMERTeacher(DIMS, C, **{**SMALL, **hp})


def make_student(hidden: int = 32, **hp) -> NMER:
    return NMER(DIMS, C, teacher=NMERTeacher(DIMS, C, hidden=hidden), teacher_hparams={"hidden": hidden}, **hp)


# ---------------------------------------------------------------------------------------------------- shapes


def test_shapes_and_layer_sizes():
    model = make_student(hidden=128)
    batch = make_batch()
    assert model.classifier.input_dim == 384 and model.teacher.classifier.input_dim == 768
    assert model.cvae.fc_mu.in_features == 768 and model.cvae.fc_mu.out_features == 64
    assert model.cvae.decoder[0].in_features == 64 + 384 and model.cvae.decoder[-1].out_features == 384
    assert len(model.cvae.encoder.layers) == 5
    assert model.cvae.encoder.layers[0].self_attn.num_heads == 8
    assert model.cvae.encoder.layers[0].linear1.out_features == 128
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in model.classifier.modules())
    out = model._run(batch)
    for key in ("f", "S", "x_recon"):
        assert out[key].shape == (B, 384)
    assert out["mu"].shape == out["logvar"].shape == (B, 64)
    assert model(batch).shape == (B, C)
    assert model.teacher(batch).shape == (B, C)
    emb = model.embeddings(batch)
    assert emb["imagined"].shape == emb["target"].shape == (B, 384)
    assert model.clip_grad_norm == 1.0


def test_spec_dims():
    dims = ModalityDims(130, 342, 1024)
    model = NMER(dims, 4, teacher=NMERTeacher(dims, 4))
    batch = make_batch(b=3, dims=dims, t=6)
    model.eval()
    assert model(batch).shape == (3, 4)
    t_spec, s_teacher = model.targets(batch)
    assert t_spec.shape == s_teacher.shape == (3, 384)
    assert model.spec_encoders.A.rnn.input_size == 130 and model.inv_encoders.V.rnn.input_size == 342


# ---------------------------------------------------------------------------------------------------- losses


def test_kl_formula():
    mu, logvar = torch.randn(5, 64), torch.randn(5, 64)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    )
    torch.testing.assert_close(gaussian_kl(mu, logvar, "none"), ref.sum(1))
    torch.testing.assert_close(gaussian_kl(mu, logvar, "sum"), ref.sum())
    torch.testing.assert_close(gaussian_kl(mu, logvar, "mean"), ref.sum() / 5)
    assert gaussian_kl(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0.0
    # "sum" scales with the batch; "mean" does not.
    mu2, lv2 = torch.cat([mu, mu]), torch.cat([logvar, logvar])
    torch.testing.assert_close(gaussian_kl(mu2, lv2, "sum"), 2 * gaussian_kl(mu, logvar, "sum"))
    torch.testing.assert_close(gaussian_kl(mu2, lv2, "mean"), gaussian_kl(mu, logvar, "mean"))
    with pytest.raises(ValueError):
        gaussian_kl(mu, logvar, "batchmean")


def test_teacher_loss_matches_hand_computation():
    teacher = make_teacher().eval()
    batch = make_batch()
    loss, parts = teacher.training_loss(batch)
    assert set(parts) == {"ce", "cmd"}
    lengths = batch["lengths"]
    spec = teacher.spec_encoders(batch["A"], batch["V"], batch["L"], lengths)
    inv = teacher.inv_encoders(batch["A"], batch["V"], batch["L"], lengths)
    shared = {m: teacher.shared(x) for m, x in inv.items()}
    logits = teacher.classifier(torch.cat([fuse(spec), fuse(shared)], dim=1))
    ce = F.cross_entropy(logits, batch["label"])
    cmd = cmd_pairwise_ref([shared[m] for m in FUSION_ORDER], 5)
    torch.testing.assert_close(parts["ce"], ce.detach())
    torch.testing.assert_close(parts["cmd"], cmd.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss.detach(), (ce + cmd).detach(), rtol=1e-4, atol=1e-5)


def test_student_loss_matches_hand_computation():
    model = make_student(kl_weight=0.5, invariant_weight=2.0, kl_reduction="sum").eval()  # eval: z = mu, no dropout
    batch = make_batch()
    loss, parts = model.training_loss(batch)
    assert set(parts) == {"ce", "invariant", "recon", "kl"}
    assert all(torch.isfinite(v) for v in parts.values())

    lengths = batch["lengths"]
    noisy = (batch["A"], batch["V"], batch["L"])
    clean = (batch["A_clean"], batch["V_clean"], batch["L_clean"])
    f = fuse(model.spec_encoders(*noisy, lengths))
    S = torch.cat([model.shared(model.inv_encoders(*noisy, lengths)[m]) for m in FUSION_ORDER], dim=1)
    h = model.cvae.encoder(torch.cat([f, S], 1).unsqueeze(1)).squeeze(1)
    mu, logvar = model.cvae.fc_mu(h), model.cvae.fc_logvar(h)
    x_recon = torch.sigmoid(model.cvae.decoder(torch.cat([mu, S], 1)))
    logits = model.classifier(x_recon)
    teacher = model.teacher
    t_spec = fuse(teacher.spec_encoders(*clean, lengths))
    s_teacher = torch.cat([teacher.shared(teacher.inv_encoders(*clean, lengths)[m]) for m in FUSION_ORDER], 1)

    ce = F.cross_entropy(logits, batch["label"])
    invariant = ((S - s_teacher) ** 2).mean()
    recon = ((x_recon - t_spec) ** 2).mean()
    kl = (-0.5 * (1 + logvar - mu**2 - logvar.exp())).sum()
    for name, value in (("ce", ce), ("invariant", invariant), ("recon", recon), ("kl", kl)):
        torch.testing.assert_close(parts[name], value.detach(), rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(loss.detach(), (ce + 2.0 * invariant + recon + 0.5 * kl).detach(), rtol=1e-5, atol=1e-5)


def test_kl_reduction_mean_and_training_mode_finite():
    assert make_student().kl_reduction == "mean"  # the paper's per-sample ELBO; "sum" is the authors' code
    model = make_student(kl_reduction="mean")
    batch = make_batch()
    model.train()
    loss, parts = model.training_loss(batch)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())
    model.eval()
    _, parts_mean = model.training_loss(batch)
    model.kl_reduction = "sum"
    _, parts_sum = model.training_loss(batch)
    torch.testing.assert_close(parts_sum["kl"], B * parts_mean["kl"])
    with pytest.raises(ValueError):
        make_student(kl_reduction="batchmean")


def test_targets_read_clean_features_only():
    model = make_student().eval()
    batch = make_batch()
    t_spec, s_teacher = model.targets(batch)
    other = dict(batch, A=torch.randn_like(batch["A"]), L=torch.zeros_like(batch["L"]))
    torch.testing.assert_close(model.targets(other)[0], t_spec)
    torch.testing.assert_close(model.targets(other)[1], s_teacher)
    torch.testing.assert_close(model.embeddings(batch)["target"], t_spec)


# ---------------------------------------------------------------------------------------------------- CVAE


def test_eval_is_deterministic_and_per_sample():
    model = make_student().eval()
    batch = make_batch()
    logits = model(batch)
    torch.testing.assert_close(model(batch), logits, rtol=0, atol=0)
    changed = {k: v.clone() for k, v in batch.items()}
    for m in ("A", "V", "L"):
        changed[m][3] = torch.randn_like(changed[m][3]) * 3
    new = model(changed)
    keep = [i for i in range(B) if i != 3]
    torch.testing.assert_close(new[keep], logits[keep], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(new[3], logits[3], atol=1e-4)
    # ... and equal to encoding every sample alone.
    alone = torch.cat([model({k: v[i : i + 1] for k, v in batch.items()}) for i in (0, 5)])
    torch.testing.assert_close(alone, logits[[0, 5]], rtol=1e-5, atol=1e-5)


def test_attend_across_batch_reproduces_batch_dependence():
    cvae = ConditionVAE(attend_across_batch=False).eval()
    authors = ConditionVAE(attend_across_batch=True).eval()
    authors.load_state_dict(cvae.state_dict())  # same parameters in both modes
    f, S = torch.rand(B, 384), torch.rand(B, 384)
    f2 = f.clone()
    f2[5] = torch.rand(384)
    keep = [i for i in range(B) if i != 5]
    with torch.no_grad():
        ours, ours2 = cvae(f, S)[0], cvae(f2, S)[0]
        theirs, theirs2 = authors(f, S)[0], authors(f2, S)[0]
    torch.testing.assert_close(ours2[keep], ours[keep], rtol=1e-5, atol=1e-6)
    assert (theirs2[keep] - theirs[keep]).abs().amax(dim=1).min() > 1e-4  # every other sample moved
    # With a batch of one the two modes coincide.
    with torch.no_grad():
        torch.testing.assert_close(authors(f[:1], S[:1])[0], ours[:1], rtol=1e-5, atol=1e-5)


def test_reparameterization_train_vs_eval():
    cvae = ConditionVAE(input_dim=16, cond_dim=16, latent_dim=4, hidden_dim=8, num_layers=1, nhead=2)
    mu, logvar = torch.randn(3, 4), torch.randn(3, 4)
    cvae.eval()
    assert torch.equal(cvae.reparameterize(mu, logvar), mu)
    cvae.train()
    torch.manual_seed(5)
    z = cvae.reparameterize(mu, logvar)
    torch.manual_seed(5)
    torch.testing.assert_close(z, mu + torch.randn(3, 4) * (0.5 * logvar).exp())
    cvae.eval()
    cvae.sample_at_eval = True  # the authors' always-sampling behaviour
    assert not torch.equal(cvae.reparameterize(mu, logvar), mu)


def test_decoder_output_range():
    f, S = torch.randn(B, 384) * 3, torch.randn(B, 384) * 3
    x_sig = ConditionVAE().eval()(f, S)[0]
    assert x_sig.min() > 0 and x_sig.max() < 1
    # The sigmoid floor: no output in (0, 1) gets closer to a target than its clip to [0, 1].
    target = torch.randn(B, 384)
    floor = ((target - target.clamp(0, 1)) ** 2).mean()
    assert F.mse_loss(x_sig, target) >= floor
    linear = ConditionVAE(decoder_activation="none").eval()
    x_lin = linear(f, S)[0]
    assert x_lin.min() < 0
    with pytest.raises(ValueError):
        ConditionVAE(decoder_activation="tanh")


# ---------------------------------------------------------------------------------------------------- training


def test_teacher_frozen_and_no_teacher_gradients():
    model = make_student()
    teacher_params = {id(p) for p in model.teacher.parameters()}
    trainable = model.trainable_parameters()
    assert not teacher_params & {id(p) for p in trainable}
    assert len(trainable) == len([p for n, p in model.named_parameters() if not n.startswith("teacher.")])
    model.train()
    assert not model.teacher.training and model.cvae.training
    loss, _ = model.training_loss(make_batch())
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    # Every student part learns, the invariant encoders through the condition S and the invariant MSE.
    for name in ("spec_encoders", "inv_encoders", "shared", "cvae", "classifier"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    # Student encoders are copies: no storage shared with the teacher.
    w_student, w_teacher = model.spec_encoders.A.rnn.weight_ih_l0, model.teacher.spec_encoders.A.rnn.weight_ih_l0
    assert w_student.data_ptr() != w_teacher.data_ptr()
    torch.testing.assert_close(w_student, w_teacher)


def _eval_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        loss, _ = model.training_loss(batch)
    model.train()
    return loss.item()


def test_adam_steps_reduce_student_loss():
    model = make_student(cvae_layers=1)
    batch = make_batch()
    opt = torch.optim.Adam(model.trainable_parameters(), lr=5e-4, betas=(0.9, 0.999))
    before = _eval_loss(model, batch)
    teacher_state = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    model.train()
    for _ in range(5):
        opt.zero_grad()
        loss, _ = model.training_loss(batch)
        loss.backward()
        model.clip_gradients_()
        opt.step()
    after = _eval_loss(model, batch)
    assert after < before
    for k, v in model.teacher.state_dict().items():  # frozen: weights and BN/running stats unchanged
        assert torch.equal(v, teacher_state[k]), k


def test_adam_steps_reduce_teacher_loss():
    teacher = make_teacher()
    batch = make_batch(b=16)
    opt = torch.optim.Adam(teacher.trainable_parameters(), lr=1e-3)
    before = _eval_loss(teacher, batch)
    for _ in range(5):
        opt.zero_grad()
        loss, _ = teacher.training_loss(batch)
        loss.backward()
        teacher.clip_gradients_()
        opt.step()
    assert _eval_loss(teacher, batch) < before


def test_teacher_optional_recon_term_any_batch_size():
    plain = make_teacher()
    assert plain.denoiser is None and not any(k.startswith("denoiser") for k in plain.state_dict())
    teacher = make_teacher(recon_weight=100.0)
    batch = make_batch(b=5)  # the authors' UNet term only works with B == 64
    loss, parts = teacher.training_loss(batch)
    assert set(parts) == {"ce", "cmd", "recon"} and torch.isfinite(parts["recon"])
    torch.testing.assert_close(loss.detach(), parts["ce"] + parts["cmd"] + 100.0 * parts["recon"], rtol=1e-5, atol=1e-4)
    teacher.zero_grad()
    (100.0 * teacher.denoiser(*teacher.encode(batch["A"], batch["V"], batch["L"], batch["lengths"]))).backward()
    assert teacher.spec_encoders.A.rnn.weight_ih_l0.grad.abs().sum() > 0  # it regularises the specific features
    assert "denoiser.alphas_cumprod" not in teacher.state_dict()
    abar = teacher.denoiser.alphas_cumprod
    assert abar.shape == (1000,) and abs(abar[0].item() - (1 - 0.00085)) < 1e-6


def test_state_dict_round_trip():
    model = make_student()
    batch = make_batch()
    model.train()
    model.training_loss(batch)[0].backward()  # also moves the BN running stats
    model.eval()
    expected = model(batch)
    loaded = NMER(DIMS, C, teacher_hparams=SMALL)  # fresh teacher, only to load into
    missing, unexpected = loaded.load_state_dict(model.state_dict())
    assert not missing and not unexpected
    assert any(k.startswith("teacher.") for k in model.state_dict())
    loaded.eval()
    torch.testing.assert_close(loaded(batch), expected, rtol=0, atol=0)
    torch.testing.assert_close(loaded.embeddings(batch)["target"], model.embeddings(batch)["target"])
    assert all(not p.requires_grad for p in loaded.teacher.parameters())
