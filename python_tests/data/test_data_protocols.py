"""Missing-modality protocols: condition table, per-epoch draws, test expansion, collate, corruption, scheduler."""

from __future__ import annotations

import math
import os

import pytest
import torch

from mmer_ext.data import (
    ALL_CONDITIONS,
    CONDITION_LABELS,
    CONDITION_NAMES,
    FULL_CONDITION,
    MISSING_CONDITIONS,
    MissingConditionDataset,
    NoiseScheduler,
    UtteranceDataset,
    collate_utterances,
    condition_index,
    corrupt_batch,
    make_synthetic_utterances,
)


@pytest.fixture(scope="module")
def small():
    return make_synthetic_utterances(preset="small", n_train=48, n_val=6, n_test=12, seed=1)


def test_condition_table():
    assert MISSING_CONDITIONS.dtype == torch.int64 and MISSING_CONDITIONS.shape == (6, 3)
    assert MISSING_CONDITIONS.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]]
    assert ALL_CONDITIONS.shape == (7, 3) and ALL_CONDITIONS[FULL_CONDITION].tolist() == [1, 1, 1]
    assert CONDITION_NAMES == ("azz", "zvz", "zzl", "avz", "azl", "zvl", "avl")
    assert CONDITION_LABELS == ("{a}", "{v}", "{l}", "{a,v}", "{a,l}", "{v,l}", "{a,v,l}")
    # Names spell the mask: a letter where present, z where zeroed.
    for name, row in zip(CONDITION_NAMES, ALL_CONDITIONS.tolist()):
        assert [c != "z" for c in name] == [bool(x) for x in row]
    assert condition_index(ALL_CONDITIONS).tolist() == list(range(7))
    with pytest.raises(ValueError):
        condition_index(torch.zeros(1, 3, dtype=torch.int64))


def test_expand_length_and_order(small):
    base = small["test"]
    n = len(base)
    ds = MissingConditionDataset(base, "expand")
    assert len(ds) == 6 * n
    for k in (0, n - 1, n, 2 * n + 3, 6 * n - 1):
        item = ds[k]
        assert item["condition"] == k // n
        assert item["index"] == k % n
        assert item["missing_index"].tolist() == MISSING_CONDITIONS[k // n].tolist()
        assert torch.equal(item["L"], base[k % n]["L"])  # features stay clean
    assert ds.conditions.tolist() == [c for c in range(6) for _ in range(n)]
    ds.set_epoch(5)  # expansion does not depend on the epoch
    assert ds.conditions.tolist() == [c for c in range(6) for _ in range(n)]


def test_train_draws_never_full_redrawn_and_deterministic():
    base = make_synthetic_utterances(preset="small", n_train=3000, n_val=0, n_test=0, seq_len=((1, 1),) * 3)["train"]
    ds = MissingConditionDataset(base, "train", seed=7)
    e0 = ds.conditions.clone()
    assert int(e0.min()) >= 0 and int(e0.max()) <= 5  # never full
    counts = torch.bincount(e0, minlength=6).double()
    expected, sd = 3000 / 6, math.sqrt(3000 * (1 / 6) * (5 / 6))
    assert ((counts - expected).abs() < 5 * sd).all()  # uniform over the six
    ds.set_epoch(1)
    e1 = ds.conditions.clone()
    assert (e1 != e0).float().mean() > 0.7  # redrawn (5/6 expected to change)
    ds.set_epoch(0)
    assert torch.equal(ds.conditions, e0)  # a function of (seed, epoch)
    assert torch.equal(MissingConditionDataset(base, "train", seed=7).conditions, e0)
    assert not torch.equal(MissingConditionDataset(base, "train", seed=8).conditions, e0)
    item = ds[11]
    assert item["condition"] == int(e0[11])
    assert item["missing_index"].tolist() == MISSING_CONDITIONS[e0[11]].tolist()
    assert torch.equal(ds.missing_index, ALL_CONDITIONS[e0])


def test_train_full_and_full_modes(small):
    base = make_synthetic_utterances(preset="small", n_train=700, n_val=0, n_test=0, seq_len=((1, 1),) * 3)["train"]
    aug = MissingConditionDataset(base, "train+full")
    assert set(aug.conditions.tolist()) == set(range(7))
    full = MissingConditionDataset(small["train"], "full")
    assert len(full) == len(small["train"])
    assert full[0]["missing_index"].tolist() == [1, 1, 1] and full[0]["condition"] == FULL_CONDITION
    with pytest.raises(ValueError):
        MissingConditionDataset(base, "test")


def test_collate_padding_and_lengths(small):
    base = small["train"]
    items = [base[i] for i in range(5)]
    batch = collate_utterances(items)
    lens = base.lengths[:5]
    assert batch["lengths"].dtype == torch.int64 and torch.equal(batch["lengths"], lens)
    for j, m in enumerate("AVL"):
        x = batch[m]
        assert x.shape == (5, int(lens[:, j].max()), base.dims[j]) and x.dtype == torch.float32
        for i in range(5):
            t = int(lens[i, j])
            assert torch.equal(x[i, :t], items[i][m])
            assert (x[i, t:] == 0).all()
    assert batch["label"].tolist() == base.labels[:5].tolist()
    assert batch["index"].tolist() == list(range(5))
    assert batch["missing_index"].tolist() == [[1, 1, 1]] * 5  # no mask on the items: all present
    assert batch["condition"].tolist() == [FULL_CONDITION] * 5
    wrapped = MissingConditionDataset(base, "expand")
    n = len(base)
    b2 = collate_utterances([wrapped[k] for k in (0, n + 1, 5 * n + 2)])
    assert b2["missing_index"].tolist() == [MISSING_CONDITIONS[c].tolist() for c in (0, 1, 5)]
    assert b2["condition"].tolist() == [0, 1, 5]
    assert b2["index"].tolist() == [0, 1, 2]


def _masked_batch(small, n=6):
    base = small["train"]
    ds = MissingConditionDataset(base, "expand")
    k = [c * len(base) + i for c, i in zip(range(6), range(n))]
    return collate_utterances([ds[i] for i in k])


def _valid(batch, j, m):
    return (torch.arange(batch[m].shape[1]) < batch["lengths"][:, j, None]).unsqueeze(-1)


def test_corrupt_zero(small):
    batch = _masked_batch(small)
    out = corrupt_batch(batch, "zero")
    assert out is not batch and out["label"] is batch["label"] and out["lengths"] is batch["lengths"]
    for j, m in enumerate("AVL"):
        assert torch.equal(out[f"{m}_clean"], batch[m])
        keep = batch["missing_index"][:, j].bool()
        assert torch.equal(out[m][keep], batch[m][keep])
        assert (out[m][~keep] == 0).all()
    assert "noise_t" not in out


def test_corrupt_gaussian_semantics(small):
    batch = _masked_batch(small)
    sched = NoiseScheduler(num_steps=1)  # t = 0 always: abar = 0.99
    abar = float(sched.alphas_cumprod[0])
    g = torch.Generator().manual_seed(0)
    out = corrupt_batch(batch, "gaussian", sched, g)
    again = corrupt_batch(batch, "gaussian", sched, torch.Generator().manual_seed(0))
    for j, m in enumerate("AVL"):
        keep = batch["missing_index"][:, j].bool()
        valid = _valid(batch, j, m).expand_as(batch[m])
        assert torch.equal(out[m][keep], batch[m][keep])  # present modalities untouched
        assert torch.equal(out[m], again[m])  # reproducible from the generator
        eps = (out[m] - math.sqrt(abar) * batch[m]) / math.sqrt(1 - abar)
        missing = (~keep).view(-1, 1, 1).expand_as(valid)
        assert (out[m][missing & ~valid] == 0).all()  # padding stays zero
        e = eps[missing & valid]
        assert e.numel() > 100
        assert abs(float(e.mean())) < 0.15 and abs(float(e.std()) - 1) < 0.15
    assert (out["noise_t"] == 0).all()


def test_corrupt_noise_step_per_batch_and_per_sample(small):
    batch = _masked_batch(small)
    sched = NoiseScheduler(num_steps=100)
    out = corrupt_batch(batch, "gaussian", sched, torch.Generator().manual_seed(3))
    t = out["noise_t"]
    assert t.shape == (6, 3) and (t == t[:1]).all()  # one t per modality per batch
    ts = torch.cat([corrupt_batch(batch, "gaussian", sched, torch.Generator().manual_seed(s), per="sample")["noise_t"]
                    for s in range(3)])
    assert ts.unique().numel() > 10 and int(ts.min()) >= 0 and int(ts.max()) <= 99


def test_corrupt_impulse_semantics(small):
    batch = _masked_batch(small)
    sched = NoiseScheduler(num_steps=1)
    abar = float(sched.alphas_cumprod[0])
    out = corrupt_batch(batch, "impulse", sched, torch.Generator().manual_seed(1))
    vals = []
    for j, m in enumerate("AVL"):
        keep = batch["missing_index"][:, j].bool()
        assert torch.equal(out[m][keep], batch[m][keep])
        valid = _valid(batch, j, m).expand_as(batch[m])
        sel = (~keep).view(-1, 1, 1).expand_as(valid) & valid
        eps = (out[m] - math.sqrt(abar) * batch[m]) / math.sqrt(1 - abar)
        assert (out[m][(~keep).view(-1, 1, 1).expand_as(valid) & ~valid] == 0).all()
        vals.append(eps[sel])
    e = torch.cat(vals)
    assert torch.allclose(e.abs(), e.abs().round(), atol=1e-3)  # each entry is -1, 0 or +1
    assert set(e.round().unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert abs(float((e.round() != 0).float().mean()) - 0.3) < 0.05  # 1[U > 0.7]: about 30 % nonzero


def test_noise_scheduler_anchors():
    for t_steps in (20, 40, 60, 80, 100):
        s = NoiseScheduler(t_steps)
        assert s.alphas_cumprod.shape == (t_steps,)
        assert round(float(s.alphas_cumprod[0]), 3) == 0.990
    s = NoiseScheduler(20)
    assert float(s.alphas_cumprod[-1]) == pytest.approx(8.4e-3, abs=5e-5)
    expected = {20: 0.613, 40: 0.479, 60: 0.406, 80: 0.358, 100: 0.324}
    for t_steps, v in expected.items():
        assert round(float(NoiseScheduler(t_steps).alphas_cumprod.sqrt().mean()), 3) == v
    betas = NoiseScheduler(5).betas
    assert torch.allclose(betas, torch.linspace(0.1, math.sqrt(0.5), 5, dtype=torch.float64) ** 2)
    g = torch.Generator().manual_seed(0)
    t = NoiseScheduler(10).sample_t(4, g)
    assert t.dtype == torch.int64 and t.shape == (4,) and (t == t[0]).all()


def test_safetensors_round_trip(tmp_path):
    splits = make_synthetic_utterances(preset="small", n_train=25, n_val=0, n_test=0, dialogue_lengths=(4, 9))
    ds = splits["train"]
    path = tmp_path / "sub" / "train.safetensors"
    ds.save(path)
    assert os.listdir(path.parent) == ["train.safetensors"]  # no temporary file left behind
    back = UtteranceDataset.load(path)
    assert back.names == ds.names and back.class_names == ds.class_names and back.dims == ds.dims
    assert back.num_classes == ds.num_classes
    assert torch.equal(back.labels, ds.labels)
    assert torch.equal(back.speakers, ds.speakers) and torch.equal(back.dialogues, ds.dialogues)
    for m in "AVL":
        assert all(torch.equal(a, b) for a, b in zip(back.features[m], ds.features[m]))
    ds.subset([0, 2]).save(path)  # overwrite in place
    assert len(UtteranceDataset.load(path)) == 2
    empty = make_synthetic_utterances(preset="small", n_train=0, n_val=0, n_test=0)["train"]
    empty.save(tmp_path / "empty.safetensors")
    assert len(UtteranceDataset.load(tmp_path / "empty.safetensors")) == 0
