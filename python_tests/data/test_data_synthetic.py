"""The embedded synthetic dataset: shapes, class imbalance, determinism, dialogue structure, a loose signal check."""

from __future__ import annotations

import pytest
import torch

from mmer_ext.data import (
    CLASS_NAMES,
    ModalityDims,
    UtteranceDataset,
    load_dataset,
    make_synthetic_utterances,
)
from mmer_ext.data.synthetic import IEMOCAP_CLASS_COUNTS, PRESETS


def _assert_same(a: UtteranceDataset, b: UtteranceDataset) -> None:
    assert a.names == b.names
    assert torch.equal(a.labels, b.labels)
    for m in "AVL":
        assert len(a.features[m]) == len(b.features[m])
        for x, y in zip(a.features[m], b.features[m]):
            assert torch.equal(x, y)
    for key in ("speakers", "dialogues"):
        x, y = getattr(a, key), getattr(b, key)
        assert (x is None and y is None) or torch.equal(x, y)


def test_small_preset_shapes_and_items():
    splits = make_synthetic_utterances(preset="small", n_train=60, n_val=12, n_test=24)
    assert set(splits) == {"train", "val", "test"}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [60, 12, 24]
    ds = splits["train"]
    assert ds.dims == PRESETS["small"]["dims"]
    assert ds.class_names == CLASS_NAMES == ("happy", "angry", "sad", "neutral")
    assert ds.num_classes == 4
    lens = ds.lengths
    for j, (lo, hi) in enumerate(PRESETS["small"]["seq_len"]):
        assert int(lens[:, j].min()) >= lo and int(lens[:, j].max()) <= hi
    item = ds[3]
    assert set(item) >= {"A", "V", "L", "label", "index"}
    assert item["index"] == 3
    for j, m in enumerate("AVL"):
        assert item[m].dtype == torch.float32 and item[m].shape == (int(lens[3, j]), ds.dims[j])
        assert torch.isfinite(item[m]).all()
    # Frame lengths of one utterance are correlated (one shared duration), as in real recordings.
    corr = torch.corrcoef(lens.T.float())
    assert corr[0, 2] > 0.5
    assert ds.speakers is None and ds.dialogues is None


def test_iemocap_dims_and_imbalance():
    splits = make_synthetic_utterances(n_train=553, n_val=10, n_test=10)
    ds = splits["train"]
    assert ds.dims == ModalityDims(130, 342, 1024)
    counts = ds.class_counts().tolist()
    expected = [c * 553 / sum(IEMOCAP_CLASS_COUNTS) for c in IEMOCAP_CLASS_COUNTS]
    assert sum(counts) == 553
    assert all(abs(c - e) < 1 for c, e in zip(counts, expected))  # exact proportions, largest-remainder rounding
    assert ds.labels[:50].unique().numel() > 1  # shuffled, not sorted by class


def test_same_seed_identical_other_seed_different():
    a = make_synthetic_utterances(preset="small", n_train=40, n_val=8, n_test=8, seed=3)
    b = make_synthetic_utterances(preset="small", n_train=40, n_val=8, n_test=8, seed=3)
    for s in a:
        _assert_same(a[s], b[s])
    c = make_synthetic_utterances(preset="small", n_train=40, n_val=8, n_test=8, seed=4)
    assert not torch.equal(a["train"].L[0][:5], c["train"].L[0][:5]) or a["train"].L[0].shape != c["train"].L[0].shape


def test_eval_splits_do_not_depend_on_train_size():
    a = make_synthetic_utterances(preset="small", n_train=40, n_val=8, n_test=8)
    b = make_synthetic_utterances(preset="small", n_train=90, n_val=8, n_test=8)
    _assert_same(a["val"], b["val"])
    _assert_same(a["test"], b["test"])


def test_dialogue_structure():
    splits = make_synthetic_utterances(preset="small", n_train=400, n_val=80, n_test=120, dialogue_lengths=(8, 20))
    seen_dialogues, seen_speakers = set(), []
    for ds in splits.values():
        assert ds.speakers is not None and ds.dialogues is not None
        d = ds.dialogues
        # Dialogues are contiguous runs with lengths within the range (the last one may be truncated).
        assert (d[1:] >= d[:-1]).all()
        runs = torch.unique_consecutive(d, return_counts=True)[1]
        assert int(runs[:-1].min()) >= 8 and int(runs.max()) <= 20
        assert not (set(d.tolist()) & seen_dialogues)  # ids unique across splits
        seen_dialogues |= set(d.tolist())
        seen_speakers.append(set(ds.speakers.tolist()))
        # At most two speakers per dialogue.
        for dlg in d.unique()[:10]:
            assert ds.speakers[d == dlg].unique().numel() <= 2
    # Speaker-independent splits: no speaker in two splits.
    assert not (seen_speakers[0] & seen_speakers[1]) and not (seen_speakers[0] & seen_speakers[2])
    # Emotion inertia: consecutive utterances of a dialogue repeat the label far more often than independent draws
    # would (sum of squared class priors ~ 0.26).
    tr = splits["train"]
    same_dlg = tr.dialogues[1:] == tr.dialogues[:-1]
    repeat = (tr.labels[1:] == tr.labels[:-1])[same_dlg].float().mean()
    assert repeat > 0.6
    assert tr.names[0] == "syn_train_d0000_u000"


def test_cache_dir_round_trip(tmp_path):
    a = make_synthetic_utterances(preset="small", n_train=30, n_val=6, n_test=6, cache_dir=tmp_path)
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 3
    b = make_synthetic_utterances(preset="small", n_train=30, n_val=6, n_test=6, cache_dir=tmp_path)
    for s in a:
        _assert_same(a[s], b[s])


def test_load_dataset_synthetic_specs():
    s = load_dataset("synthetic:small", n_train=20, n_val=4, n_test=4)
    assert s["train"].dims == PRESETS["small"]["dims"] and len(s["test"]) == 4
    s = load_dataset("synthetic", n_train=4, n_val=2, n_test=2)
    assert s["train"].dims == ModalityDims(130, 342, 1024)
    with pytest.raises(ValueError):
        load_dataset("synthetic:huge")
    with pytest.raises(ValueError):
        load_dataset("imagenet:/x")


def test_modalities_carry_signal_of_different_strength():
    """Loose sanity probe (the calibrated values are in the module docstring): a linear classifier on time-averaged
    features beats chance clearly but is far from perfect, and the lexical modality beats the visual one."""
    sklearn = pytest.importorskip("sklearn")  # noqa: F841
    from sklearn.linear_model import LogisticRegression

    splits = make_synthetic_utterances(preset="small", n_train=900, n_val=0, n_test=600, seed=0)
    ftr, fte = splits["train"].mean_features(), splits["test"].mean_features()
    ytr, yte = splits["train"].labels.numpy(), splits["test"].labels.numpy()

    def acc(ms):
        xtr = torch.cat([ftr[m] for m in ms], 1).numpy()
        xte = torch.cat([fte[m] for m in ms], 1).numpy()
        return LogisticRegression(max_iter=1000, C=0.1).fit(xtr, ytr).score(xte, yte)

    chance = max(IEMOCAP_CLASS_COUNTS) / sum(IEMOCAP_CLASS_COUNTS)
    full, lex, vis = acc("AVL"), acc("L"), acc("V")
    assert chance + 0.15 < full < 0.95
    assert lex > vis
    assert full > vis + 0.1


def test_cached_splits_are_checked_like_real_data(tmp_path):
    from mmer_ext.data import DataFormatError, load_splits, make_synthetic_utterances, save_splits

    splits = make_synthetic_utterances(seed=0, preset="small", n_train=12, n_val=4, n_test=4)
    save_splits(splits, tmp_path / "ok")
    assert load_dataset(f"cache:{tmp_path / 'ok'}")["val"].names == splits["val"].names
    import copy

    bad = copy.deepcopy(splits)
    bad["val"].features["V"][2][1, 3] = float("nan")
    save_splits(bad, tmp_path / "nan")
    with pytest.raises(DataFormatError, match=rf"val.safetensors: modality V, utterance '{bad['val'].names[2]}': "
                                              "frame 1 holds NaN"):
        load_splits(tmp_path / "nan")
    leak = copy.deepcopy(splits)
    leak["test"].names[0] = leak["train"].names[5]
    save_splits(leak, tmp_path / "leak")
    with pytest.raises(DataFormatError, match=f"utterance '{leak['train'].names[5]}' is in both train and test"):
        load_splits(tmp_path / "leak")
    (tmp_path / "ok" / "test.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match="test.safetensors: not a readable UtteranceDataset"):
        load_splits(tmp_path / "ok")
