"""IMDer: projections, per-sample missingness, recovery, the two stages, training and devices (IMDer, Wang et al., NeurIPS 2023; github.com/mdswyz/IMDer)."""

from __future__ import annotations

import pytest
import torch

from mmer_ext.models import IMDer
from mmer_ext.models import imder as imder_module
from mmer_ext.models.score_net import FrameScoreNet, ScoreNet
from mmer_ext.ops import ve_marginal_std
from mmer_ext.sampling import sample

DIMS = (5, 20, 32)
T = 12
TINY = dict(d_model=8, nlevels=1, num_heads=2, score_channels=(8, 16, 32, 32), score_heads=2, score_layers=1,
            score_embed_dim=16, score_hidden=16, score_depth=1, rcab_blocks=2, steps=3)
# Every pattern with at least one modality present (A, V, L; 1 = present).
PATTERNS = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]])


def make_batch(b=7, t=T, missing=None, seed=0, clean=False):
    g = torch.Generator().manual_seed(seed)
    batch = {m: torch.randn(b, t, d, generator=g) for m, d in zip("AVL", DIMS)}
    batch["label"] = torch.rand(b, generator=g) * 6 - 3
    if missing is not None:
        batch["missing_index"] = missing
    if clean:
        for j, m in enumerate("AVL"):
            batch[f"{m}_clean"] = batch[m]
            batch[m] = batch[m] * missing[:, j].view(-1, 1, 1)
    return batch


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return IMDer(DIMS, **{**TINY, **kw})


def test_projection_length_anchor():
    # IMDer's code: proj output (B, 32, 48) for T = 50.
    model = tiny(d_model=32, num_heads=8)
    x = torch.randn(2, 50, DIMS[0])
    assert model.project(x, "A").shape == (2, 32, 48)
    assert model.fusion.combined_dim == 192


def test_default_configuration():
    model = IMDer((5, 20, 768), rcab_blocks=1)  # fewer blocks only to build faster
    assert model.sampler == "em" and model.steps == 100 and model.sigma == 25.0
    assert model.clip_grad_value == 1.0 and model.clip_grad_norm is None
    # The package's per-frame score net by default; the authors' U-Net (their widths) on request.
    assert model.score_net == "frame" and isinstance(model.score["A"], FrameScoreNet)
    assert model.score["A"].cond_window == 5 and model.score["A"].out.in_features == 256
    unet = IMDer((5, 20, 768), rcab_blocks=1, score_net="unet")
    assert isinstance(unet.score["A"], ScoreNet) and unet.score["A"].widths == (32, 64, 128, 256)
    with pytest.raises(ValueError, match="score_net"):
        IMDer((5, 20, 768), rcab_blocks=1, score_net="mlp")
    assert model.proj["L"].weight.shape == (32, 768, 3) and model.proj["L"].bias is None
    assert model.stage == "pretrain"
    assert sorted(model.fuse) == ["AL", "AV", "VL"] and model.fuse["AV"].weight.shape == (32, 64, 1)


@pytest.mark.parametrize("b", [1, 7])
def test_forward_every_pattern(b):
    model = tiny().eval()
    missing = PATTERNS[torch.arange(b) % 7]
    pred = model(make_batch(b, missing=missing), generator=torch.Generator().manual_seed(0))
    assert pred.shape == (b,) and torch.isfinite(pred).all()
    assert torch.equal(model.predict(make_batch(b, missing=missing), generator=torch.Generator().manual_seed(0)),
                       pred)


@pytest.mark.parametrize("pattern", PATTERNS.tolist())
def test_training_loss_single_pattern(pattern):
    model = tiny().train()
    missing = torch.tensor([pattern] * 3)
    loss, parts = model.training_loss(make_batch(3, missing=missing), generator=torch.Generator().manual_seed(0))
    assert set(parts) == {"l1", "score", "rec"}
    if all(pattern):
        assert parts["score"] == 0 and parts["rec"] == 0
    else:
        assert parts["score"] > 0 and parts["rec"] > 0
    torch.testing.assert_close(loss.detach(), parts["l1"] + 0.1 * (parts["score"] + parts["rec"]))
    loss.backward()


def test_no_missing_index_means_complete_and_recovers_nothing(monkeypatch):
    # MR = 0 (the authors' bug): nothing is sampled, no auxiliary loss.
    model = tiny()
    calls = []
    monkeypatch.setattr(imder_module, "_run_sampler", lambda *a, **k: calls.append(1))
    loss, parts = model.training_loss(make_batch(4))
    assert not calls and parts["score"] == 0 and parts["rec"] == 0
    torch.testing.assert_close(loss.detach(), parts["l1"])
    assert model.recover(make_batch(4)) == {}
    complete = torch.ones(4, 3, dtype=torch.long)
    assert model.recover(make_batch(4, missing=complete)) == {}


def test_missing_features_are_never_read():
    model = tiny().eval()
    missing = PATTERNS[torch.arange(7)]
    b1 = make_batch(7, missing=missing)
    b2 = {k: v.clone() for k, v in b1.items()}
    for j, m in enumerate("AVL"):
        gone = missing[:, j] == 0
        b2[m][gone] = torch.randn_like(b2[m][gone]) * 10
    p1 = model(b1, generator=torch.Generator().manual_seed(3))
    p2 = model(b2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(p1, p2)


def test_recover_rows_targets_and_clean_features():
    model = tiny().eval()
    missing = PATTERNS[torch.arange(7)]
    batch = make_batch(7, missing=missing, clean=True)  # missing modalities zeroed, truth in *_clean
    out = model.recover(batch, generator=torch.Generator().manual_seed(0))
    assert sorted(out) == ["A", "L", "V"]
    for j, m in enumerate("AVL"):
        rows = torch.nonzero(missing[:, j] == 0).flatten()
        rec, target = out[m]
        assert rec.shape == target.shape == (len(rows), 8, T - 2)
        with torch.no_grad():
            expected = model.proj[m](batch[f"{m}_clean"][rows].transpose(1, 2))
        torch.testing.assert_close(target, expected)
    pred, rec2 = model.predict_with_recovery(batch, generator=torch.Generator().manual_seed(0))
    assert pred.shape == (7,)
    for m in out:
        torch.testing.assert_close(rec2[m][0], out[m][0])


def test_conditions_per_pattern(monkeypatch):
    model = tiny()
    seen = {}

    def spy(name, score_fn, cond, **kw):
        seen.setdefault("conds", []).append(cond)
        return sample(name, score_fn, cond, **kw)

    monkeypatch.setattr(imder_module, "_run_sampler", spy)
    # L missing in rows 0 (A only), 1 (V only), 2 (A and V -> fused).
    missing = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    batch = make_batch(3, missing=missing)
    model.eval()
    model(batch)
    feats = {m: model.project(batch[m], m) for m in "AVL"}
    cond_l = seen["conds"][-1]
    torch.testing.assert_close(cond_l[0], feats["A"][0])
    torch.testing.assert_close(cond_l[1], feats["V"][1])
    torch.testing.assert_close(cond_l[2], model.fuse["AV"](torch.cat([feats["A"][2:], feats["V"][2:]], 1))[0])


def test_bad_missing_index():
    model = tiny()
    with pytest.raises(ValueError, match="every modality missing"):
        model(make_batch(2, missing=torch.tensor([[1, 1, 1], [0, 0, 0]])))
    with pytest.raises(ValueError, match="missing_index must be"):
        model(make_batch(2, missing=torch.ones(2, 2, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"batch\['V'\]"):
        model({**make_batch(2), "V": torch.randn(2, T, 3)})
    with pytest.raises(ValueError, match="dims"):
        IMDer((5, 20), **TINY)


def test_teacher_to_student_copies_and_freezes_projections():
    teacher = tiny(seed=0)
    student = IMDer(DIMS, teacher=teacher, **TINY)
    assert student.stage == "missing"
    for (k, v), (k2, v2) in zip(teacher.state_dict().items(), student.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    proj_params = {id(p) for p in student.proj.parameters()}
    assert all(not p.requires_grad for p in student.proj.parameters())
    assert not proj_params & {id(p) for p in student.trainable_parameters()}
    student.train()
    assert not student.proj.training and student.fusion.training
    before = {k: v.clone() for k, v in student.proj.state_dict().items()}
    missing = PATTERNS[torch.arange(7)]
    opt = torch.optim.Adam(student.trainable_parameters(), lr=1e-2)
    loss, _ = student.training_loss(make_batch(7, missing=missing))
    loss.backward()
    assert all(p.grad is None for p in student.proj.parameters())
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in student.proj.state_dict().items())
    # The teacher itself is left as it was (weights copied, not shared).
    # (its score EMA is frozen by construction: it only moves through after_optimizer_step)
    assert all(p.requires_grad for n, p in teacher.named_parameters() if not n.startswith("score_ema."))
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters()}
    with pytest.raises(ValueError, match="architecture"):
        IMDer(DIMS, teacher=teacher, **{**TINY, "rcab_blocks": 1})
    with pytest.raises(ValueError, match="dims"):
        IMDer((5, 20, 33), teacher=teacher, **TINY)


def test_pretraining_stage_trains_projections():
    model = tiny()
    loss, _ = model.training_loss(make_batch(4))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.proj.parameters())


def test_training_steps_reduce_the_loss():
    model = tiny(embed_dropout=0.0, attn_dropout_a=0.0)
    missing = PATTERNS[torch.arange(14) % 7]
    batch = make_batch(14, missing=missing, seed=1)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=3e-3)

    def loss_at_fixed_noise():
        return model.training_loss(batch, generator=torch.Generator().manual_seed(99))

    with torch.no_grad():
        first = loss_at_fixed_noise()[0].item()
    for _ in range(15):
        loss, _ = loss_at_fixed_noise()
        opt.zero_grad()
        loss.backward()
        model.clip_gradients_()
        opt.step()
    with torch.no_grad():
        last = loss_at_fixed_noise()[0].item()
    assert last < 0.7 * first, (first, last)


def test_determinism_under_a_seed():
    missing = PATTERNS[torch.arange(7)]
    outs = []
    for _ in range(2):
        model = tiny(seed=5)
        torch.manual_seed(11)
        loss, parts = model.training_loss(make_batch(7, missing=missing))
        outs.append((loss.item(), {k: v.item() for k, v in parts.items()}))
    assert outs[0] == outs[1]
    model = tiny(seed=5).eval()
    p1 = model(make_batch(7, missing=missing), generator=torch.Generator().manual_seed(1))
    p2 = model(make_batch(7, missing=missing), generator=torch.Generator().manual_seed(1))
    assert torch.equal(p1, p2)


def test_clip_gradients_by_value():
    model = tiny(clip_grad_value=1e-4)
    loss, _ = model.training_loss(make_batch(4, missing=PATTERNS[1:5]))
    loss.backward()
    peak = model.clip_gradients_()
    assert peak is not None and peak > 1e-4
    assert max(p.grad.abs().max().item() for p in model.trainable_parameters() if p.grad is not None) <= 1e-4
    assert tiny(clip_grad_value=None).clip_gradients_() is None


def test_set_sampler(monkeypatch):
    model = tiny()
    seen = []

    def spy(name, score_fn, cond, **kw):
        seen.append((name, kw["steps"], kw.get("snr")))
        return sample(name, score_fn, cond, **kw)

    monkeypatch.setattr(imder_module, "_run_sampler", spy)
    model.set_sampler("pc", 2, snr=0.2)
    model.eval()(make_batch(2, missing=torch.tensor([[1, 0, 1], [1, 1, 0]])))
    assert seen == [("pc", 2, 0.2), ("pc", 2, 0.2)]
    model.set_sampler("em")
    assert model.steps == 2 and model.sampler_kwargs == {}
    with pytest.raises(ValueError, match="steps"):
        model.set_sampler("em", 0)
    with pytest.raises(ValueError, match="unknown sampler"):
        model.set_sampler("dpm-solver")


class _ExactScore(torch.nn.Module):
    """The exact score when the target given the condition is ``N(cond, s^2)``: ``-(x - cond) / (s^2 + std(t)^2)``."""

    def __init__(self, s: float):
        super().__init__()
        self.s = s

    def forward(self, x, t, cond):
        std = ve_marginal_std(t, 25.0)
        return -(x - cond) / (self.s**2 + std.view(-1, 1, 1) ** 2)


# (sampler, steps, options): few steps, on the schedules that suit each.
RECOVERY_SAMPLERS = {"em": (100, {}), "pc": (50, {}), "ode": (50, {"schedule": "linear"}),
                     "ode-heun": (10, {"schedule": "linear"}), "ddim": (10, {"schedule": "karras"})}


@pytest.mark.parametrize("name", sorted(imder_module.SAMPLERS))
def test_every_sampler_recovers(name):
    # A model whose recovery has a known answer: the three modalities carry the same features through the same
    # projection, the pair fusions average their two inputs, so every condition equals the missing modality's
    # projection; the score nets are the exact score of N(condition, 0.1^2) and the refiners pass the sample through.
    # A sampler that lost the condition, mixed up rows or returned the wrong tensor would not reach the target.
    assert set(RECOVERY_SAMPLERS) == set(imder_module.SAMPLERS)
    torch.manual_seed(0)
    model = IMDer((6, 6, 6), **{**TINY, "steps": 1}, score_ema=None).eval()  # sample with the nets set below
    with torch.no_grad():
        for m in "VL":
            model.proj[m].weight.copy_(model.proj["A"].weight)
        eye = torch.eye(8).unsqueeze(-1)
        for pair in model.fuse.values():
            pair.weight.copy_(torch.cat([eye, eye], 1) / 2)
            pair.bias.zero_()
    for m in "AVL":
        model.score[m] = _ExactScore(0.1)
        model.refine[m] = torch.nn.Identity()
    steps, options = RECOVERY_SAMPLERS[name]
    model.set_sampler(name, steps, **options)
    feats = torch.randn(12, T, 6, generator=torch.Generator().manual_seed(1))
    batch = {"A": feats, "V": feats.clone(), "L": feats.clone(), "label": torch.zeros(12),
             "missing_index": PATTERNS[torch.arange(12) % 6 + 1]}
    out = model.recover(batch, generator=torch.Generator().manual_seed(0))
    assert sorted(out) == ["A", "L", "V"]
    for m, (rec, target) in out.items():
        missing = (batch["missing_index"][:, "AVL".index(m)] == 0).sum()
        assert rec.shape == target.shape == (missing, 8, T - 2)
        corr = float(torch.corrcoef(torch.stack([rec.flatten(), target.flatten()]))[0, 1])
        mse = float((rec - target).pow(2).mean())
        # Exact posterior samples: mse = 0.1^2 = 0.01 against a target variance of ~0.2. Measured: ODE, Heun, DDIM
        # 0.006-0.011; PC 0.022 (its Langevin moves widen the spread); EM 1e-4 (the "imder" grid's last step, below
        # t = 0, pulls the sample onto the condition); correlations >= 0.97.
        assert corr > 0.95 and mse < 0.03, (m, corr, mse)


def test_classification_head():
    model = tiny(num_classes=3)
    batch = make_batch(4, missing=PATTERNS[:4])
    batch["label"] = torch.tensor([0, 1, 2, 1])
    assert model.eval()(batch).shape == (4, 3)
    assert model.predict(batch).shape == (4,)
    loss, parts = model.train().training_loss(batch)
    assert "ce" in parts and torch.isfinite(loss)


def _tensor_attributes(module):
    for name, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if isinstance(value, torch.Tensor) and attr not in ("_parameters", "_buffers"):
                yield f"{name}.{attr}"


def test_no_hard_coded_device_or_dtype():
    model = tiny()
    # Every tensor the model holds is a parameter or a buffer, so .to() moves it.
    assert list(_tensor_attributes(model)) == []
    assert {b.device for b in model.buffers()} == {torch.device("cpu")}
    model = model.double().eval()
    batch = {k: (v.double() if v.is_floating_point() else v)
             for k, v in make_batch(3, missing=PATTERNS[1:4]).items()}
    pred = model(batch)
    assert pred.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_follows_the_input_device_cuda():
    model = tiny().cuda().eval()
    batch = {k: v.cuda() for k, v in make_batch(3, missing=PATTERNS[1:4]).items()}
    pred = model(batch, generator=torch.Generator("cuda").manual_seed(0))
    assert pred.device.type == "cuda"
    loss, _ = model.train().training_loss(batch)
    loss.backward()


@pytest.mark.parametrize("mode", ["shared", "independent", "clean"])
def test_condition_noise_reaches_the_score_loss_and_the_sampler(monkeypatch, mode):
    import mmer_ext.models.imder as imder_module

    modes, sampled = [], []
    real = imder_module.dsm_loss

    def spy(*args, **kwargs):
        modes.append(kwargs.get("condition_noise"))
        return real(*args, **kwargs)

    def sampler_spy(name, score_fn, cond, **kw):
        sampled.append(kw.get("condition_noise"))
        return sample(name, score_fn, cond, **kw)

    monkeypatch.setattr(imder_module, "dsm_loss", spy)
    monkeypatch.setattr(imder_module, "_run_sampler", sampler_spy)
    model = tiny(condition_noise=mode)
    model.training_loss(make_batch(b=3, missing=torch.tensor([[1, 0, 1]] * 3)))
    assert modes and set(modes) == {mode}
    assert sampled and set(sampled) == {mode}
    with pytest.raises(ValueError, match="condition_noise"):
        tiny(condition_noise="fresh")


def test_condition_is_clean_by_default_and_not_a_sampler_option():
    model = tiny()
    assert model.condition_noise == "clean"
    assert IMDer.legacy_defaults == {"condition_noise": "shared", "score_ema": None, "score_net": "unet",
                                     "refine_residual": False}
    with pytest.raises(ValueError, match="condition_noise is the model's"):
        model.set_sampler("em", 3, condition_noise="shared")


def test_untrained_refiner_is_the_identity_by_default():
    # An untrained residual refiner passes the sample through; the authors' plain stack maps it to something else,
    # and the reconstruction loss's gradient still reaches every weight of the residual one.
    from mmer_ext.models.imder import RecoveryRefiner

    x = torch.randn(4, 8, 11)
    residual, plain = RecoveryRefiner(8, num_blocks=2, reduction=4), RecoveryRefiner(8, 2, 4, residual=False)
    assert torch.equal(residual(x), x)
    assert (plain(x) - x).abs().mean() > 0.1
    residual(x).sub(torch.randn_like(x)).pow(2).mean().backward()
    assert residual[2].weight.grad.abs().sum() > 0
    assert all(m.refine[k].residual for m in (tiny(),) for k in m.refine)
    assert not any(m.refine[k].residual for m in (tiny(refine_residual=False),) for k in m.refine)
    from mmer_ext.models.recipes import RECIPES

    assert all(s.hparams.get("refine_residual") is False for s in RECIPES["imder-authors"])
    assert all("refine_residual" not in s.hparams for s in RECIPES["imder"])


def test_clean_sampling_feeds_the_condition_itself(monkeypatch):
    # With the default the score nets see exactly the condition the model built (no re-noising), at every call.
    model = tiny(score_ema=None).eval()  # the sampler reads model.score, wrapped below
    conds, seen = [], []
    real_condition = model._condition

    def keep_condition(*args, **kwargs):
        rows, cond = real_condition(*args, **kwargs)
        conds.append(cond.detach().clone())
        return rows, cond

    monkeypatch.setattr(model, "_condition", keep_condition)
    net = model.score["A"]

    def spy(x, t, c):
        seen.append(c.clone())
        return net(x, t, c)

    model.score["A"] = _Wrap(spy)
    model.recover(make_batch(3, missing=torch.tensor([[0, 1, 1]] * 3)), generator=torch.Generator().manual_seed(0))
    assert len(seen) == model.steps and all(torch.equal(c, conds[0]) for c in seen)


class _Wrap(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, t, c):
        return self.fn(x, t, c)


def test_clip_gradients_returns_the_peak_and_clamps_every_gradient():
    model = tiny()
    params = [p for p in model.trainable_parameters()]
    g = torch.Generator().manual_seed(3)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 3
    before = [p.grad.clone() for p in params]
    peak = model.clip_gradients_()
    assert peak == max(b.abs().max() for b in before)
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b.clamp(-model.clip_grad_value, model.clip_grad_value))
    assert tiny(clip_grad_value=None).clip_gradients_() is None
