"""IF-MMIN (IF-MMIN, Zuo et al., ICASSP 2023; github.com/ZhuoYulang/IF-MMIN): UttShared teacher (CE + CMD) and the IFMMIN student (invariant-aware imagination)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from mmer_ext.models.encoders import ResidualXE, fuse
from mmer_ext.models.ifmmin import IFMMIN, UttShared
from mmer_ext.ops._reference import cmd_pairwise_ifmmin_style, cmd_pairwise_ref

from mmer_ext.data import ModalityDims
from model_batches import C, DIMS, SIX, make_batch, train_steps  # noqa: E402


FULL = torch.ones(8, 3, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------- UttShared


def test_uttshared_shapes_real_dims():
    dims = ModalityDims(130, 342, 1024)
    model = UttShared(dims, C).eval()
    assert model.classifier.input_dim == 768
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in model.classifier.modules()) == 2
    assert model(make_batch(dims, b=2, steps=(4, 3, 6), missing=FULL[:2])).shape == (2, C)


def test_uttshared_cmd_term_equals_reference():
    model = UttShared(DIMS, C).eval()
    batch = make_batch(missing=FULL)
    loss, parts = model.training_loss(batch)
    assert set(parts) == {"ce", "cmd"}
    feats = model.encoders(batch["A"], batch["V"], batch["L"], batch["lengths"])
    inv = {m: model.shared(x) for m, x in feats.items()}
    ref = cmd_pairwise_ref([inv["L"], inv["V"], inv["A"]], 5)
    torch.testing.assert_close(parts["cmd"], ref.detach())
    # The average over pairs is symmetric: the authors' (l, v), (l, a), (a, v) gives the same number.
    torch.testing.assert_close(cmd_pairwise_ref([inv["A"], inv["L"], inv["V"]], 5), ref)
    torch.testing.assert_close(cmd_pairwise_ifmmin_style([inv["L"], inv["V"], inv["A"]], 5), ref)
    logits = model.classifier(torch.cat([fuse(feats), fuse(inv)], 1))
    ce = F.cross_entropy(logits, batch["label"])
    torch.testing.assert_close(parts["ce"], ce.detach())
    torch.testing.assert_close(loss, ce + ref)
    heavy = UttShared(DIMS, C, cmd_weight=0.25).eval()
    heavy.load_state_dict(model.state_dict())
    loss2, p2 = heavy.training_loss(batch)
    torch.testing.assert_close(loss2, p2["ce"] + 0.25 * p2["cmd"])


def test_uttshared_cmd_gradient_matches_reference():
    # float64, so the comparison tests the formula, not float32 rounding of fifth moments.
    model = UttShared(DIMS, C, cmd_weight=1.0).double().eval()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in make_batch(missing=FULL).items()}
    feats = model.encoders(batch["A"], batch["V"], batch["L"], batch["lengths"])
    inv = [model.shared(feats[m]) for m in "LVA"]
    grads = torch.autograd.grad(model.cmd_loss(dict(zip("LVA", inv))), list(model.shared.parameters()),
                                retain_graph=True)
    ref = torch.autograd.grad(cmd_pairwise_ref(inv, 5), list(model.shared.parameters()))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)


def test_uttshared_steps_reduce_loss():
    model = UttShared(DIMS, C)
    batch = make_batch(missing=FULL)
    losses = train_steps(model, batch, 15, lr=2e-3)
    assert losses[-1] < 0.7 * losses[0]


# ---------------------------------------------------------------------------------------------------- IFMMIN


def test_ifmmin_shapes_and_structure_real_dims():
    dims = ModalityDims(130, 342, 1024)
    model = IFMMIN(dims, C, teacher=UttShared(dims, C)).eval()
    assert isinstance(model.ae, ResidualXE) and model.ae.input_dim == 384 and model.ae.latent_dim == 320
    assert model.classifier.input_dim == 320 and model.teacher.classifier.input_dim == 768
    assert not hasattr(model, "ae_cycle")
    assert model.invariant_weight == 100.0 and model.mse_weight == 1.0 and model.clip_grad_norm == 1.0
    batch = make_batch(dims, b=2, steps=(4, 3, 6))
    assert model(batch).shape == (2, C)
    emb = model.embeddings(batch)
    assert emb["imagined"].shape == (2, 384) and emb["target"].shape == (2, 384)


def test_ifmmin_copies_teacher_encoders_and_shared():
    teacher = UttShared(DIMS, C)
    model = IFMMIN(DIMS, C, teacher=teacher).train()
    for student, source in ((model.encoders, teacher.encoders), (model.shared, teacher.shared)):
        for p, q in zip(student.parameters(), source.parameters()):
            assert torch.equal(p, q) and p is not q and p.requires_grad and not q.requires_grad
    assert not model.teacher.training
    trainable = {id(p) for p in model.trainable_parameters()}
    assert not trainable & {id(p) for p in teacher.parameters()}


def test_ifmmin_loss_parts_match_hand_computation():
    model = IFMMIN(DIMS, C, teacher=UttShared(DIMS, C)).eval()
    batch = make_batch()
    loss, parts = model.training_loss(batch)
    assert set(parts) == {"ce", "mse", "invariant"} and torch.isfinite(loss)
    lengths, mi = batch["lengths"], batch["missing_index"]

    feats = model.encoders(batch["A"], batch["V"], batch["L"], lengths)
    f_miss = torch.cat([feats["A"], feats["L"], feats["V"]], 1)
    s = torch.cat([model.shared(feats[m]) for m in "ALV"], 1)
    recon, latent = model.ae(f_miss, s)
    with torch.no_grad():
        rev = [batch[f"{m}_clean"] * (1 - mi[:, j]).view(-1, 1, 1) for j, m in enumerate("AVL")]
        t_feats = model.teacher.encoders(*rev, lengths)
        target = torch.cat([t_feats["A"], t_feats["L"], t_feats["V"]], 1)
        full = model.teacher.encoders(batch["A_clean"], batch["V_clean"], batch["L_clean"], lengths)
        s_teacher = torch.cat([model.teacher.shared(full[m]) for m in "ALV"], 1)
    ce = F.cross_entropy(model.classifier(latent), batch["label"])
    mse = F.mse_loss(recon, target)
    inv = F.mse_loss(s, s_teacher)
    torch.testing.assert_close(parts["ce"], ce.detach())
    torch.testing.assert_close(parts["mse"], mse.detach())
    torch.testing.assert_close(parts["invariant"], inv.detach())
    torch.testing.assert_close(loss, ce + mse + 100.0 * inv)
    # At initialisation the student's shared encoder is the teacher's: on full input the invariant loss is 0.
    _, p_full = model.training_loss(make_batch(missing=FULL))
    assert p_full["invariant"].item() == pytest.approx(0.0, abs=1e-10)


def test_ifmmin_gradients_reach_only_trainable_parameters():
    teacher = UttShared(DIMS, C)
    model = IFMMIN(DIMS, C, teacher=teacher).train()
    model.training_loss(make_batch())[0].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert not [n for n, p in model.named_parameters() if not n.startswith("teacher.") and p.grad is None]


def test_ifmmin_zeroed_modality_changes_nothing_at_inference():
    model = IFMMIN(DIMS, C, teacher=UttShared(DIMS, C)).eval()
    batch = make_batch(missing=SIX[torch.tensor([1] * 8)])  # zvz: A and L missing
    logits = model(batch)
    changed = dict(batch, A_clean=torch.randn_like(batch["A_clean"]), L_clean=torch.randn_like(batch["L_clean"]))
    torch.testing.assert_close(model(changed), logits)
    torch.testing.assert_close(model({k: v[2:5] for k, v in batch.items()}), logits[2:5], atol=1e-6, rtol=1e-5)


def test_ifmmin_steps_reduce_loss():
    model = IFMMIN(DIMS, C, teacher=UttShared(DIMS, C))
    batch = make_batch()
    losses = train_steps(model, batch, 20, lr=1e-3, betas=(0.5, 0.999))
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0]


def test_ifmmin_state_dict_round_trip():
    model = IFMMIN(DIMS, C, teacher=UttShared(DIMS, C))
    model.training_loss(make_batch())[0].backward()
    torch.optim.Adam(model.trainable_parameters(), lr=1e-2).step()
    restored = IFMMIN(DIMS, C)
    restored.load_state_dict(model.state_dict())
    model.eval()
    restored.eval()
    batch = make_batch(seed=5)
    torch.testing.assert_close(restored(batch), model(batch))
    torch.testing.assert_close(restored.training_loss(batch)[0], model.training_loss(batch)[0])
