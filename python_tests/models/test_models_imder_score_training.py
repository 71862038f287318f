"""IMDer's score training beyond the authors: the score-pretraining loss on every complete sample, the EMA of the
score weights the sampler reads, baseline fills and the raw sample in ``predict_with_recovery``, the condition skip
of the score net, and the recipe's score stage through the trainer."""

from __future__ import annotations

import pytest
import torch

from mmer_ext.models import IMDer
from mmer_ext.models import imder as imder_module
from mmer_ext.models.score_net import ScoreNet

DIMS = (5, 20, 32)
T = 12
TINY = dict(d_model=8, nlevels=1, num_heads=2, score_channels=(8, 16), score_heads=2, score_layers=1,
            score_embed_dim=16, score_hidden=16, score_depth=1, rcab_blocks=1, steps=2, sampler="ddim")


def batch(b=6, seed=0, missing=None):
    g = torch.Generator().manual_seed(seed)
    out = {m: torch.randn(b, T, d, generator=g) for m, d in zip("AVL", DIMS)}
    out["label"] = torch.rand(b, generator=g) * 6 - 3
    if missing is not None:
        out["missing_index"] = missing
    return out


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return IMDer(DIMS, **{**TINY, **kw})


def test_score_pretraining_loss_trains_every_score_net_and_fusion_only():
    model = IMDer(DIMS, teacher=tiny(), objective="score", **TINY)
    loss, parts = model.training_loss(batch(), generator=torch.Generator().manual_seed(0))
    assert set(parts) == {"score_A", "score_V", "score_L"} and torch.isfinite(loss)
    assert float(loss.detach()) == pytest.approx(sum(float(v) for v in parts.values()), rel=1e-6)
    loss.backward()
    for m in "AVL":
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.score[m].parameters())
    # the recognition path gets nothing; some pair fusion is used (random subsets) and gets a gradient
    assert all(p.grad is None for p in model.fusion.parameters())
    assert any(p.grad is not None for p in model.fuse.parameters())
    assert all(p.grad is None for p in model.refine.parameters())


def test_score_pretraining_conditions_on_present_subsets(monkeypatch):
    # A row missing V can only train A's net from L and L's net from A; V's net gets no row from it.
    model = tiny()
    seen = []
    real = imder_module.dsm_loss

    def spy(net, x, cond, *a, **kw):
        seen.append((net, x.shape[0]))
        return real(net, x, cond, *a, **kw)

    monkeypatch.setattr(imder_module, "dsm_loss", spy)
    missing = torch.tensor([[1, 0, 1]] * 4 + [[1, 1, 1]] * 2)
    model.score_pretraining_loss(batch(missing=missing))
    counts = {m: n for net, n in seen for m in "AVL" if net is model.score[m]}
    assert counts == {"A": 6, "V": 2, "L": 6}
    with pytest.raises(ValueError, match="no row"):
        model.score_pretraining_loss(batch(missing=torch.tensor([[1, 0, 0]] * 6)))


def test_ema_warms_up_moves_towards_the_weights_and_is_what_the_sampler_reads(monkeypatch):
    model = tiny()
    assert model.score_ema_decay == 0.999 and int(model.score_ema_updates) == 0
    ema0 = [p.clone() for p in model.score_ema.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(ema0, model.score.parameters()))
    assert not any(p.requires_grad for p in model.score_ema.parameters())
    assert all(id(p) not in {id(q) for q in model.score_ema.parameters()} for p in model.trainable_parameters())
    with torch.no_grad():
        for p in model.score.parameters():
            p.add_(1.0)
    model.after_optimizer_step()
    # first update: decay min(0.999, 1/10) = 0.1, so the EMA moves 90 % of the way
    for e, e0 in zip(model.score_ema.parameters(), ema0):
        assert torch.allclose(e, e0 + 0.9)
    assert int(model.score_ema_updates) == 1
    used = []
    monkeypatch.setattr(imder_module, "_run_sampler", lambda name, net, cond, **kw: used.append(net) or cond * 0)
    model.eval()(batch(missing=torch.tensor([[0, 1, 1]] * 6)))
    assert used == [model.score_ema["A"]]
    plain = tiny(score_ema=None)
    assert not hasattr(plain, "score_ema") or plain.score_ema_decay is None
    plain.after_optimizer_step()  # a no-op
    with pytest.raises(ValueError, match="score_ema"):
        tiny(score_ema=1.0)
    with pytest.raises(ValueError, match="objective"):
        tiny(objective="nope")


def test_student_takes_the_teachers_ema_or_starts_one():
    teacher = tiny()
    with torch.no_grad():
        for p in teacher.score_ema.parameters():
            p.add_(3.0)
    teacher.score_ema_updates += 5
    student = IMDer(DIMS, teacher=teacher, **TINY)
    assert all(torch.equal(a, b) for a, b in zip(student.score_ema.parameters(), teacher.score_ema.parameters()))
    assert int(student.score_ema_updates) == 5
    old = tiny(score_ema=None)  # a teacher from before the EMA: the student's EMA starts at its score weights
    student = IMDer(DIMS, teacher=old, **TINY)
    assert all(torch.equal(a, b) for a, b in zip(student.score_ema.parameters(), old.score.parameters()))
    back = IMDer(DIMS, teacher=teacher, score_ema=None, **TINY)
    assert all(torch.equal(a, b) for a, b in zip(back.score.parameters(), teacher.score.parameters()))


def test_fill_and_raw_sample_in_predict_with_recovery():
    model = tiny().eval()
    missing = torch.tensor([[0, 1, 1], [1, 0, 1], [1, 1, 1], [0, 0, 1], [1, 1, 0], [1, 1, 1]])
    b = batch(missing=missing)
    calls = []

    def zeros(m, cond):
        calls.append((m, cond.shape[0]))
        return torch.zeros_like(cond)

    _, rec = model.predict_with_recovery(b, fill=zeros, refine=False)
    assert sorted(calls) == [("A", 2), ("L", 1), ("V", 2)]
    assert all(float(r.abs().sum()) == 0.0 for r, _ in rec.values())
    _, refined = model.predict_with_recovery(b, fill=zeros)
    assert all(torch.allclose(refined[m][0], model.refine[m](torch.zeros_like(rec[m][0]))) for m in rec)
    # the default path is the sampler: a seeded raw sample equals sample_modality's with the same seed
    _, raw = model.predict_with_recovery(b, generator=torch.Generator().manual_seed(3), refine=False)
    present = model.presence(b)
    proj = {m: model.project(b[m], m) for m in "AVL"}
    _, cond = model._condition(proj, present, "A")
    again = model.sample_modality("A", cond, torch.Generator().manual_seed(3))
    assert torch.allclose(raw["A"][0], again)


def test_condition_skip_adds_a_direct_condition_path():
    torch.manual_seed(0)
    net = ScoreNet(8, None, 8, widths=(8, 16), embed_dim=16, num_heads=2, num_layers=1, cond_skip=True)
    torch.manual_seed(0)
    plain = ScoreNet(8, None, 8, widths=(8, 16), embed_dim=16, num_heads=2, num_layers=1)
    assert net.state_dict().keys() == plain.state_dict().keys()  # no new weights: the same net, one more path
    x, c = torch.randn(2, 8, 10), torch.randn(2, 8, 10)
    assert not torch.allclose(net(x, 0.5, c), plain(x, 0.5, c))
    assert torch.allclose(net(x, 0.5, None), plain(x, 0.5, None))
    assert tiny(score_cond_skip=True, score_net="unet").score["A"].down[0].cond_skip


@pytest.mark.slow
def test_recipe_score_stage_through_the_trainer(tmp_path):
    from mmer_ext.data import load_dataset
    from mmer_ext.models.recipes import RECIPES
    from mmer_ext.train import fit, load_config, load_model
    from mmer_ext.train.trainer import resolve_stages

    names = [s.name for s in RECIPES["imder"]]
    assert names == ["pretrain", "score", "main"] and [s.name for s in RECIPES["imder-authors"]] == ["pretrain", "main"]
    score = RECIPES["imder"][1]
    assert score.select_mode == "last" and score.inherit_hparams and score.repeats > 1
    hp = {k: v for k, v in TINY.items() if k not in ("steps", "sampler")}
    cfg = load_config(None, model="imder", data="synthetic-mosi-small", data_options={"sizes": [16, 8, 8]},
                      out_dir=str(tmp_path / "run"), device="cpu", batch_size=8, progress=False, sampler="ddim",
                      sampler_steps=2, stage_epochs={"pretrain": 1, "score": 2, "main": 1},
                      hparams={"pretrain": hp, "main": hp})
    stages = resolve_stages(cfg)
    # the score stage inherits the pretrained architecture; an explicit epoch count counts passes
    assert stages[1].hparams["score_channels"] == hp["score_channels"] and stages[1].repeats == 1
    assert stages[1].hparams["objective"] == "score" and stages[2].hparams.get("objective", "task") == "task"
    result = fit(cfg, splits=load_dataset("synthetic-mosi-small", seed=0, sizes=[16, 8, 8]))
    history = result.stages[1].history
    assert [h["epoch"] for h in history] == [1, 2] and result.stages[1].best_epoch == 2  # the last epoch kept
    assert set(history[0]["train"]) >= {"score_A", "score_V", "score_L"}
    model = result.model
    assert int(model.score_ema_updates) > 0 and model.objective == "task"
    loaded, meta = load_model(tmp_path / "run" / "model.safetensors")
    assert meta["stages"] == ["pretrain", "score", "main"]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
