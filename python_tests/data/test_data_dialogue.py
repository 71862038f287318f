"""Dialogue data (MMGCN): DialogueGCN-style pickles in the exact layout MMGCN reads (github.com/hujingwen6666/MMGCN), the safe format, batching, the
missing-modality view and masking, and the synthetic dialogues (determinism, structure, context helps)."""

from __future__ import annotations

import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch

from mmer_ext.data import (
    ALL_CONDITIONS,
    IEMOCAP_ERC_CLASS_FREQUENCIES,
    IEMOCAP_ERC_CLASS_NAMES,
    MELD_CLASS_NAMES,
    DataFormatError,
    DialogueConditionView,
    DialogueDataset,
    NonstandardSplitWarning,
    UnsafePickleWarning,
    collate_dialogues,
    convert_pickle,
    corrupt_dialogue_batch,
    label_persistence,
    load_dataset,
    load_dialogue_dataset,
    load_iemocap_erc,
    load_meld,
    make_synthetic_dialogues,
    split_dialogues,
)

DIMS = {"text": 4, "audio": 7, "visual": 5}  # deliberately all different, so a swapped modality shows


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _tables(n_dialogues: int, prefix: str, rng: np.random.Generator, meld: bool, lengths=None):
    ids, spk, lab, text, audio, visual, sent = {}, {}, {}, {}, {}, {}, {}
    for d in range(n_dialogues):
        vid = f"{prefix}{d:02d}" if not meld else int(prefix == "te") * 1000 + d
        n = int(lengths[d]) if lengths is not None else int(rng.integers(2, 6))
        ids[vid] = [f"{vid}_{k:03d}" for k in range(n)]
        if meld:
            who = rng.integers(0, 9, n)
            spk[vid] = [[1.0 if j == w else 0.0 for j in range(9)] for w in who]
            lab[vid] = rng.integers(0, 7, n).tolist()
        else:
            spk[vid] = ["M" if rng.random() < 0.5 else "F" for _ in range(n)]
            lab[vid] = rng.integers(0, 6, n).tolist()
        text[vid] = rng.standard_normal((n, DIMS["text"])).astype(np.float32)
        audio[vid] = rng.standard_normal((n, DIMS["audio"])).astype(np.float32)
        # A list of 1-D arrays, as some pickles store them; the loader must stack it.
        visual[vid] = [rng.standard_normal(DIMS["visual"]).astype(np.float32) for _ in range(n)]
        sent[vid] = [f"sentence {k}" for k in range(n)]
    return ids, spk, lab, text, audio, visual, sent


def write_pickle(path, *, meld=False, n_train=10, n_test=3, seed=0, mutate=None, train_lengths=None,
                 test_lengths=None, as_set=False):
    """A DialogueGCN-style pickle: IEMOCAP 9-tuple / MELD 10-tuple of dicts keyed by dialogue id (MMGCN's dataloader.py)."""
    rng = np.random.default_rng(seed)
    tr = _tables(n_train, "tr", rng, meld, train_lengths)
    te = _tables(n_test, "te", rng, meld, test_lengths)
    tables = [{**a, **b} for a, b in zip(tr, te)]
    train_vid, test_vid = list(tr[0]), list(te[0])
    if as_set:
        train_vid, test_vid = set(train_vid), set(test_vid)
    obj = [*tables, train_vid, test_vid] + ([None] if meld else [])
    if mutate is not None:
        obj = mutate(obj)
    with open(path, "wb") as f:
        pickle.dump(tuple(obj) if isinstance(obj, list) else obj, f)
    return str(path), tables, train_vid, test_vid


def _quiet_load(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsafePickleWarning)
        warnings.simplefilter("ignore", NonstandardSplitWarning)
        return fn(*args, **kw)


def _same(a: DialogueDataset, b: DialogueDataset) -> None:
    assert a.names == b.names and a.dims == b.dims and a.class_names == b.class_names
    assert a.num_speakers == b.num_speakers and a.utterance_names == b.utterance_names
    for g in range(len(a)):
        assert torch.equal(a.labels[g], b.labels[g]) and torch.equal(a.speakers[g], b.speakers[g])
        for m in "AVL":
            assert torch.equal(a.features[m][g], b.features[m][g])


# ---------------------------------------------------------------------------------------------------------- pickles
def test_iemocap_pickle_layout_is_read_exactly(tmp_path):
    path, tables, train_vid, test_vid = write_pickle(tmp_path / "IEMOCAP_features.pkl")
    with pytest.warns(UnsafePickleWarning, match="convert"), pytest.warns(NonstandardSplitWarning, match="120"):
        splits = load_iemocap_erc(path)
    ids, spk, lab, text, audio, visual, _ = tables
    tr, va, te = splits["train"], splits["val"], splits["test"]
    assert len(va) == 1 and len(tr) == 9 and te.names == test_vid  # 10 % of 10 training dialogues
    assert sorted(tr.names + va.names) == sorted(train_vid)
    assert tr.dims == (DIMS["audio"], DIMS["visual"], DIMS["text"])  # A, V, L read from the data
    assert tr.class_names == IEMOCAP_ERC_CLASS_NAMES and tr.num_classes == 6 and tr.num_speakers == 2
    for ds in (tr, va, te):
        for g, vid in enumerate(ds.names):
            assert ds.labels[g].tolist() == lab[vid]
            assert ds.speakers[g].tolist() == [0 if s == "M" else 1 for s in spk[vid]]
            assert ds.utterance_names[g] == ids[vid]
            np.testing.assert_array_equal(ds.features["A"][g].numpy(), audio[vid])
            np.testing.assert_array_equal(ds.features["V"][g].numpy(), np.stack(visual[vid]))
            np.testing.assert_array_equal(ds.features["L"][g].numpy(), text[vid])
            assert ds.features["A"][g].dtype == torch.float32


def test_meld_pickle_layout(tmp_path):
    path, tables, train_vid, test_vid = write_pickle(tmp_path / "MELD_features_raw1.pkl", meld=True, n_train=6)
    splits = _quiet_load(load_meld, path, val_fraction=0.34, split_seed=3)
    _, spk, lab, *_ = tables
    assert len(splits["val"]) == 2 and len(splits["train"]) == 4
    te = splits["test"]
    assert te.names == [str(v) for v in test_vid] and te.class_names == MELD_CLASS_NAMES
    assert te.num_speakers == 9 and te.num_classes == 7
    for g, vid in enumerate(test_vid):
        assert te.speakers[g].tolist() == [int(np.argmax(row)) for row in spk[vid]]
        assert te.labels[g].tolist() == lab[vid]


def test_val_protocols_and_seeded_split(tmp_path):
    path, *_ = write_pickle(tmp_path / "iemocap.pkl", n_train=20)
    a = _quiet_load(load_iemocap_erc, path, split_seed=1)
    b = _quiet_load(load_iemocap_erc, path, split_seed=1)
    c = _quiet_load(load_iemocap_erc, path, split_seed=2)
    assert a["val"].names == b["val"].names and len(a["val"]) == 2
    assert a["val"].names != c["val"].names  # another seed, other dialogues (20 choose 2 makes a tie unlikely)
    assert not set(a["val"].names) & set(a["train"].names)
    authors = _quiet_load(load_iemocap_erc, path, val_from="test")
    assert authors["val"] is authors["test"] and len(authors["train"]) == 20
    with pytest.raises(ValueError, match="val_from"):
        _quiet_load(load_iemocap_erc, path, val_from="dev")


def test_standard_split_sizes_checked(tmp_path):
    # The real split: 120 / 31 dialogues, 5810 / 1623 utterances; no warning then.
    tr_len = np.full(120, 48)
    tr_len[:50] += 1  # 120 * 48 + 50 = 5810
    te_len = np.full(31, 52)
    te_len[:11] += 1  # 31 * 52 + 11 = 1623
    path, *_ = write_pickle(tmp_path / "std.pkl", n_train=120, n_test=31, train_lengths=tr_len, test_lengths=te_len)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsafePickleWarning)
        warnings.simplefilter("error", NonstandardSplitWarning)
        splits = load_iemocap_erc(path, val_from="test")
    assert splits["train"].num_utterances == 5810 and splits["test"].num_utterances == 1623
    small, *_ = write_pickle(tmp_path / "small.pkl")
    with pytest.raises(DataFormatError, match="standard iemocap-erc split"):
        _quiet_load(load_iemocap_erc, small, check_split="raise")
    _quiet_load(load_iemocap_erc, small, check_split="ignore")


def test_set_of_ids_is_sorted(tmp_path):
    path, _, train_vid, test_vid = write_pickle(tmp_path / "s.pkl", as_set=True)
    splits = _quiet_load(load_iemocap_erc, path, val_from="test")
    assert splits["train"].names == sorted(train_vid) and splits["test"].names == sorted(test_vid)


def _drop(field, vid="tr01"):
    def f(obj):
        del obj[field][vid]
        return obj
    return f


def _set(field, value, vid="tr01"):
    def f(obj):
        obj[field][vid] = value
        return obj
    return f


@pytest.mark.parametrize("mutate, match", [
    (lambda obj: obj[:8], "expected a 9-tuple, got 8 items"),
    (lambda obj: obj + [None], "10-tuple is the MELD layout"),
    (lambda obj: {"not": "a tuple"}, "expected a 9-tuple"),
    (_drop(4), "tr01.*no entry in videoAudio"),
    (_drop(1), "tr01.*no entry in videoSpeakers"),
    (_set(2, [0, 1, 2, 3, 4, 5, 0, 1, 2]), "labels"),  # more labels than utterance ids
    (_set(4, np.zeros((2, 3), np.float32)), "videoAudio has shape"),
    (_set(3, np.zeros((3, 9), np.float32)), "videoText has"),
    (_set(2, [0, 9, 1]), "labels outside 0..5"),
    (_set(1, ["M", "X", "F"]), "neither 'M' nor 'F'"),
    (lambda obj: obj[:8] + [obj[7][:2]], "both trainVid and testVid"),
    (lambda obj: obj[:7] + [obj[7] + obj[7][:1], obj[8]], r"'tr00' is listed twice in trainVid \(rows 0 and 10\)"),
    (_set(4, np.array([[0.0] * 7, [np.nan] * 7, [0.0] * 7], np.float32)),
     r"bad.pkl: dialogue 'tr01' \(trainVid\): videoAudio: utterance 1 holds NaN"),
    (_set(3, np.array([[0.0] * 4, [0.0] * 4, [np.inf] * 4], np.float32)),
     "dialogue 'tr01' .*: videoText: utterance 2 holds NaN or infinite"),
    (lambda obj: obj[:7] + [obj[7] + ["nope"], obj[8]], "'nope'.*no entry in videoIDs"),
])
def test_pickle_format_errors(tmp_path, mutate, match):
    def fix_lengths(obj):
        # Make dialogue tr01 have exactly 3 utterances first, so each mutation breaks one thing only.
        obj = list(obj)
        vid = "tr01"
        obj[0][vid] = [f"{vid}_{k}" for k in range(3)]
        obj[1][vid] = ["M", "F", "M"]
        obj[2][vid] = [0, 1, 2]
        obj[3][vid] = np.zeros((3, DIMS["text"]), np.float32)
        obj[4][vid] = np.zeros((3, DIMS["audio"]), np.float32)
        obj[5][vid] = np.zeros((3, DIMS["visual"]), np.float32)
        return mutate(obj)

    path, *_ = write_pickle(tmp_path / "bad.pkl", mutate=fix_lengths)
    with pytest.raises(DataFormatError, match=match):
        _quiet_load(load_iemocap_erc, path)


def test_missing_file_and_garbage(tmp_path):
    with pytest.raises(DataFormatError, match="file not found"):
        load_iemocap_erc(tmp_path / "nope.pkl")
    bad = tmp_path / "garbage.pkl"
    bad.write_bytes(b"definitely not a pickle")
    with pytest.raises(DataFormatError, match="cannot unpickle"):
        _quiet_load(load_meld, bad)
    with pytest.raises(DataFormatError, match="needs a path"):
        load_dialogue_dataset("meld")
    with pytest.raises(DataFormatError, match="unknown dialogue source"):
        load_dialogue_dataset("iemocap4:x")


# ------------------------------------------------------------------------------------------------------ safe format
@pytest.mark.parametrize("meld", [False, True])
def test_convert_round_trip_without_pickle(tmp_path, meld):
    path, *_ = write_pickle(tmp_path / "src.pkl", meld=meld, n_train=12)
    with pytest.warns(UnsafePickleWarning):
        out = _quiet_nonstandard(convert_pickle, path, tmp_path / "safe")
    assert sorted(os.listdir(out)) == ["dialogues.json", "features.safetensors"]
    index = json.loads((tmp_path / "safe" / "dialogues.json").read_text())
    assert index["source"] == ("meld" if meld else "iemocap-erc") and set(index["splits"]) == {"train", "test"}
    direct = _quiet_load(load_meld if meld else load_iemocap_erc, path, split_seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no pickle warning (nor any other) on the safe path
        converted = load_dialogue_dataset(f"dialogues:{tmp_path / 'safe'}", split_seed=5)
        routed = load_dataset(f"dialogues:{tmp_path / 'safe'}", split_seed=5)
    for key in ("train", "val", "test"):
        _same(direct[key], converted[key])
        _same(direct[key], routed[key])


def _quiet_nonstandard(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonstandardSplitWarning)
        return fn(*args, **kw)


def test_converted_files_must_match(tmp_path):
    a, *_ = write_pickle(tmp_path / "a.pkl", seed=1)
    b, *_ = write_pickle(tmp_path / "b.pkl", seed=2)
    _quiet_load(convert_pickle, a, tmp_path / "A")
    _quiet_load(convert_pickle, b, tmp_path / "B")
    os.replace(tmp_path / "B" / "dialogues.json", tmp_path / "A" / "dialogues.json")
    with pytest.raises(DataFormatError, match="different conversions"):
        load_dialogue_dataset(f"dialogues:{tmp_path / 'A'}")
    with pytest.raises(DataFormatError, match="file not found"):
        load_dialogue_dataset(f"dialogues:{tmp_path / 'B'}")


def test_load_dataset_routes_pickles(tmp_path):
    path, *_ = write_pickle(tmp_path / "m.pkl", meld=True)
    with pytest.warns(UnsafePickleWarning):
        splits = _quiet_nonstandard(load_dataset, f"meld:{path}", fold=3, val_from="test")
    assert splits["val"] is splits["test"] and splits["train"].num_classes == 7
    ipath, *_ = write_pickle(tmp_path / "i.pkl")
    splits = _quiet_load(load_dataset, f"iemocap-erc:{ipath}")
    assert isinstance(splits["train"], DialogueDataset) and splits["train"].num_classes == 6


# ----------------------------------------------------------------------------------------------- batches, conditions
def _toy(g=4, seed=0) -> DialogueDataset:
    gen = torch.Generator().manual_seed(seed)
    lens = [3, 1, 5, 2][:g]
    return DialogueDataset(
        [torch.randn(n, 3, generator=gen) for n in lens], [torch.randn(n, 2, generator=gen) for n in lens],
        [torch.randn(n, 4, generator=gen) for n in lens], [torch.arange(n) % 2 for n in lens],
        [torch.arange(n) % 3 for n in lens], [f"d{k}" for k in range(g)], num_speakers=2)


def test_collate_concatenates_dialogues():
    ds = _toy()
    batch = collate_dialogues([ds[2], ds[0]])
    assert batch["lengths"].tolist() == [5, 3] and batch["dialogue"].tolist() == [2, 0]
    assert batch["A"].shape == (8, 3) and batch["V"].shape == (8, 2) and batch["L"].shape == (8, 4)
    assert torch.equal(batch["A"], torch.cat([ds.features["A"][2], ds.features["A"][0]]))
    assert torch.equal(batch["label"], torch.cat([ds.labels[2], ds.labels[0]]))
    assert torch.equal(batch["speaker"], torch.cat([ds.speakers[2], ds.speakers[0]]))
    assert torch.equal(batch["missing_index"], torch.ones(8, 3, dtype=torch.int64))
    assert batch["condition"].tolist() == [6] * 8
    assert all(v.dtype == torch.int64 for k, v in batch.items() if k not in "AVL")
    with pytest.raises(ValueError, match="empty"):
        collate_dialogues([])


def test_condition_view_modes():
    ds = _toy()
    expand = DialogueConditionView(ds, "expand")
    assert len(expand) == 24
    batch = collate_dialogues([expand[k] for k in range(len(expand))])
    n = ds.num_utterances
    assert batch["condition"].tolist() == sum(([c] * n for c in range(6)), [])
    assert torch.equal(batch["missing_index"], ALL_CONDITIONS[batch["condition"]])
    assert torch.equal(batch["A"], torch.cat([torch.cat(ds.features["A"])] * 6))
    fixed = DialogueConditionView(ds, condition="azl")
    assert len(fixed) == 4 and fixed[2]["missing_index"].tolist() == [[1, 0, 1]] * 5
    assert (fixed[1]["condition"] == 4).all()
    assert (DialogueConditionView(ds)[0]["condition"] == 6).all()
    with pytest.raises(ValueError, match="condition"):
        DialogueConditionView(ds, condition="xyz")


def test_condition_view_training_draws():
    ds = make_synthetic_dialogues(preset="small", n_dialogues_train=10, n_val=0, n_test=0)["train"]
    view = DialogueConditionView(ds, "train", seed=3)
    again = DialogueConditionView(ds, "train", seed=3)
    conds = lambda v: torch.cat([v[k]["condition"] for k in range(len(v))])  # noqa: E731
    first = conds(view)
    assert torch.equal(first, conds(again)) and first.max() < 6 and len(first.unique()) == 6
    view.set_epoch(1)
    assert not torch.equal(first, conds(view))
    per_dlg = DialogueConditionView(ds, "train+full", seed=0, per="dialogue")
    for k in range(len(per_dlg)):
        assert per_dlg[k]["condition"].unique().numel() == 1


def test_corrupt_dialogue_batch():
    ds = _toy()
    view = DialogueConditionView(ds, "expand")
    clean = collate_dialogues([view[k] for k in range(len(view))])
    out = corrupt_dialogue_batch(clean)
    for j, m in enumerate("AVL"):
        keep = clean["missing_index"][:, j].bool()
        assert torch.equal(out[f"{m}_clean"], clean[m])
        assert torch.equal(out[m][keep], clean[m][keep]) and (out[m][~keep] == 0).all()
    noisy = corrupt_dialogue_batch(clean, "gaussian", generator=torch.Generator().manual_seed(0))
    a_missing = ~clean["missing_index"][:, 0].bool()
    assert torch.equal(noisy["A"][~a_missing], clean["A"][~a_missing])
    assert not torch.equal(noisy["A"][a_missing], clean["A"][a_missing]) and noisy["noise_t"].shape == (66, 3)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        corrupt_dialogue_batch({"A": torch.zeros(2, 3, 4), "V": torch.zeros(2, 3), "L": torch.zeros(2, 3)})


def test_dataset_validation_and_subset():
    ds = _toy()
    sub = ds.subset([3, 0])
    assert sub.names == ["d3", "d0"] and sub.lengths.tolist() == [2, 3] and sub.num_speakers == 2
    rest, held = split_dialogues(ds, 0.25, seed=0)
    assert len(held) == 1 and sorted(rest.names + held.names) == ds.names
    with pytest.raises(ValueError, match="modality V has shape"):
        DialogueDataset([torch.zeros(2, 3)], [torch.zeros(3, 2)], [torch.zeros(2, 4)], [torch.zeros(2)],
                        [torch.zeros(2)])
    with pytest.raises(ValueError, match="speaker ids"):
        DialogueDataset([torch.zeros(2, 3)], [torch.zeros(2, 2)], [torch.zeros(2, 4)], [torch.tensor([0, 2])],
                        [torch.zeros(2)], num_speakers=2)


# --------------------------------------------------------------------------------------------------------- synthetic
def test_synthetic_default_structure():
    splits = make_synthetic_dialogues(n_dialogues_train=40, n_val=4, n_test=10)
    tr = splits["train"]
    assert [len(splits[s]) for s in ("train", "val", "test")] == [40, 4, 10]
    assert tr.dims == (1582, 342, 100) and tr.class_names == IEMOCAP_ERC_CLASS_NAMES and tr.num_speakers == 2
    lens = tr.lengths
    assert lens.min() >= 10 and lens.max() <= 110
    assert all(s.unique().numel() >= 2 for s in tr.speakers)  # every dialogue has two people talking
    freq = tr.class_counts().double() / tr.num_utterances
    assert torch.allclose(freq, torch.tensor(IEMOCAP_ERC_CLASS_FREQUENCIES, dtype=torch.float64), atol=0.06)
    for m in "AVL":
        assert all(torch.isfinite(x).all() for x in tr.features[m])
    persist = label_persistence(tr)
    assert persist["same_next"] > persist["chance"] + 0.4  # emotions persist along the dialogue


def test_synthetic_deterministic_and_split_streams():
    a = make_synthetic_dialogues(preset="small", n_dialogues_train=6, n_val=2, n_test=3, seed=4)
    b = make_synthetic_dialogues(preset="small", n_dialogues_train=6, n_val=2, n_test=3, seed=4)
    c = make_synthetic_dialogues(preset="small", n_dialogues_train=9, n_val=2, n_test=3, seed=4)
    d = make_synthetic_dialogues(preset="small", n_dialogues_train=6, n_val=2, n_test=3, seed=5)
    for key in ("train", "val", "test"):
        _same(a[key], b[key])
    _same(a["test"], c["test"])  # the test set does not move with the training-set size
    assert not torch.equal(a["train"].features["A"][0][:1], d["train"].features["A"][0][:1])
    routed = load_dataset("synthetic-dialogue:small", seed=4, n_dialogues_train=6, n_val=2, n_test=3)
    _same(a["train"], routed["train"])
    authors = make_synthetic_dialogues(preset="small", n_dialogues_train=2, n_val=2, n_test=2, val_from="test")
    assert authors["val"] is authors["test"]
    multi = make_synthetic_dialogues(preset="small", n_dialogues_train=8, n_val=0, n_test=0,
                                     speakers_per_dialogue=(3, 5))["train"]
    assert multi.num_speakers == 5 and max(int(s.max()) for s in multi.speakers) <= 4


def test_synthetic_context_helps():
    """A linear probe that also sees the neighbours' features (+-3 utterances) beats the utterance-level one."""
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression

    splits = make_synthetic_dialogues(preset="small", n_dialogues_train=40, n_val=0, n_test=20, seed=0)

    def features(ds, context):
        rows = []
        for g in range(len(ds)):
            x = torch.cat([ds.features[m][g] for m in "AVL"], 1)
            if context:
                pos = torch.arange(x.shape[0])
                w = ((pos[:, None] - pos[None, :]).abs() <= 3).float()
                w.fill_diagonal_(0)
                x = torch.cat([x, (w / w.sum(1, keepdim=True).clamp_min(1)) @ x], 1)
            rows.append(x)
        return torch.cat(rows).numpy()

    ytr, yte = splits["train"].flat_labels().numpy(), splits["test"].flat_labels().numpy()
    acc = {}
    for context in (False, True):
        clf = LogisticRegression(max_iter=500, C=0.1).fit(features(splits["train"], context), ytr)
        acc[context] = float((clf.predict(features(splits["test"], context)) == yte).mean())
    assert acc[False] > 0.35  # the utterance itself is informative (chance ~ 0.25 for the majority class)
    assert acc[True] > acc[False] + 0.05


@pytest.mark.parametrize("meld", [False, True])
def test_cli_converts_then_trains_and_evaluates_mmgcn(tmp_path, capsys, monkeypatch, meld):
    """What a user with the real pickle does: convert it once, train MMGCN on the safe copy, evaluate."""
    from mmer_ext.cli import main

    monkeypatch.chdir(tmp_path)
    src, *_ = write_pickle(tmp_path / "features.pkl", meld=meld, n_train=10, n_test=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonstandardSplitWarning)
        assert main(["convert", src, "safe"]) == 0, capsys.readouterr().err
        model = "mmgcn-meld" if meld else "mmgcn"
        argv = ["train", "--model", model, "--data", "dialogues:safe", "--epochs", "1", "--batch-size", "4",
                "--out", "run", "--device", "cpu", "--no-progress", "--set", "hparams.main.num_layers=4"]
        assert main(argv) == 0, capsys.readouterr().err
        run = json.loads((tmp_path / "run" / "run.json").read_text())
        assert run["num_classes"] == (7 if meld else 6) and run["dims"] == [DIMS["audio"], DIMS["visual"], DIMS["text"]]
        capsys.readouterr()
        assert main(["evaluate", "run/model.safetensors", "--json", "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"{a}", "average", "{a,v,l}"} <= set(metrics)
