"""MMSA pickles (as IMDer's data_loader.py reads them; github.com/mdswyz/IMDer) in the exact layout, aligned and unaligned: loading, -inf handling, text_bert, format
errors naming file and key, the pickle-free converted copy, the SequenceDataset container and its batches, and the
``convert`` command."""

from __future__ import annotations

import json
import os
import re
import pickle
import warnings

import numpy as np
import pytest
import torch

from mmer_ext.data import (
    DataFormatError,
    SequenceDataset,
    UnsafePickleWarning,
    collate_sequences,
    convert_mmsa,
    load_dataset,
    load_mmsa,
    load_mmsa_cache,
)

SIZES = {"train": 5, "valid": 3, "test": 4}
D_TEXT, D_AUDIO, D_VISION = 12, 5, 20  # MOSI's A / V sizes; a small text size keeps the files tiny


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _split(n: int, rng: np.random.Generator, split: str, aligned: bool) -> dict:
    t_a, t_v = (50, 50) if aligned else (15, 11)
    audio = rng.standard_normal((n, t_a, D_AUDIO)).astype(np.float32)
    audio[:, 0, 1] = -np.inf  # silent frames: MMSA writes -inf log-energies
    ids = np.array([f"vid{split}{i // 2}$_${i % 2}" for i in range(n)])
    mask = np.zeros((n, 50), dtype=np.float32)
    text_len = rng.integers(3, 50, n)
    for i, k in enumerate(text_len):
        mask[i, :k] = 1
    input_ids = (rng.integers(100, 30000, (n, 50)) * mask).astype(np.float32)
    d = {
        "id": ids,
        "raw_text": np.array([f"sentence {split} {i}" for i in range(n)]),
        "text": rng.standard_normal((n, 50, D_TEXT)).astype(np.float32),
        "text_bert": np.stack([input_ids, mask, np.zeros_like(mask)], 1),
        "audio": audio,
        "vision": rng.standard_normal((n, t_v, D_VISION)).astype(np.float32),
        "regression_labels": rng.uniform(-3, 3, n).astype(np.float32),
        "classification_labels": rng.integers(0, 3, n).astype(np.float32),
        "annotations": np.array(["Positive"] * n),
    }
    if not aligned:
        d["audio_lengths"] = rng.integers(1, t_a + 1, n).tolist()
        d["vision_lengths"] = list(rng.integers(1, t_v + 1, n))
    return d


def _tables(aligned: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {split: _split(n, rng, split, aligned) for split, n in SIZES.items()}


def _write(tmp_path, obj, name="aligned_50.pkl") -> str:
    path = os.path.join(tmp_path, name)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)
    return path


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsafePickleWarning)
        return fn(*args, **kw)


def _same(a: SequenceDataset, b: SequenceDataset) -> None:
    for m in ("A", "V", "L"):
        assert torch.equal(a.features[m], b.features[m])
    assert torch.equal(a.labels, b.labels) and torch.equal(a.lengths, b.lengths)
    assert a.ids == b.ids and a.raw_text == b.raw_text
    assert (a.text_bert is None) == (b.text_bert is None)
    if a.text_bert is not None:
        assert torch.equal(a.text_bert, b.text_bert)


# ---------------------------------------------------------------------------------------------------------------------
# Loading the exact layout
# ---------------------------------------------------------------------------------------------------------------------
def test_aligned_pickle_read_exactly(tmp_path):
    tables = _tables(aligned=True)
    path = _write(tmp_path, tables)
    with pytest.warns(UnsafePickleWarning, match="convert"):
        out = load_mmsa(path)
    assert list(out) == ["train", "val", "test"]
    for split, key in (("train", "train"), ("val", "valid"), ("test", "test")):
        ds, src = out[split], tables[key]
        assert len(ds) == SIZES[key] and ds.dims == (D_AUDIO, D_VISION, D_TEXT) and ds.seq_len == (50, 50, 50)
        assert ds.aligned and bool((ds.lengths == 50).all())
        for m in ("A", "V", "L"):
            assert ds.features[m].dtype == torch.float32
        want_audio = np.where(np.isneginf(src["audio"]), 0, src["audio"])
        np.testing.assert_array_equal(ds.A.numpy(), want_audio)
        assert float(ds.A[:, 0, 1].abs().sum()) == 0.0
        np.testing.assert_array_equal(ds.V.numpy(), src["vision"])
        np.testing.assert_array_equal(ds.L.numpy(), src["text"])
        np.testing.assert_array_equal(ds.labels.numpy(), src["regression_labels"])
        assert ds.labels.dtype == torch.float32
        assert ds.ids == list(src["id"]) and ds.ids[1] == f"vid{key}0$_$1"
        assert ds.raw_text == list(src["raw_text"])
        assert ds.text_bert is None  # only with use_bert
        assert ds.num_classes == 1 and ds.class_names == ("sentiment",) and ds.task == "regression"
    # The caller's object is not modified (the -inf fix works on a copy).
    assert np.isneginf(tables["train"]["audio"][:, 0, 1]).all()


def test_use_bert_keeps_text_bert(tmp_path):
    tables = _tables()
    out = _quiet(load_mmsa, _write(tmp_path, tables), use_bert=True)
    tb = out["train"].text_bert
    assert tb.dtype == torch.int64 and tb.shape == (SIZES["train"], 3, 50)
    np.testing.assert_array_equal(tb.numpy(), tables["train"]["text_bert"].astype(np.int64))
    item = out["train"][2]
    assert item["text_bert"].shape == (3, 50)
    batch = collate_sequences([out["train"][i] for i in range(3)])
    assert batch["text_bert"].shape == (3, 3, 50) and batch["text_bert"].dtype == torch.int64


def test_unaligned_pickle_lengths(tmp_path):
    tables = _tables(aligned=False)
    out = _quiet(load_mmsa, _write(tmp_path, tables, "unaligned_50.pkl"))
    ds, src = out["test"], tables["test"]
    assert ds.seq_len == (15, 11, 50) and not ds.aligned
    assert ds.lengths[:, 0].tolist() == list(src["audio_lengths"])
    assert ds.lengths[:, 1].tolist() == [int(x) for x in src["vision_lengths"]]
    # L: the attention-mask length of text_bert, with or without use_bert (which only decides whether it is kept).
    assert ds.lengths[:, 2].tolist() == src["text_bert"][:, 1].sum(1).astype(int).tolist()
    assert ds.text_bert is None
    bert = _quiet(load_mmsa, _write(tmp_path, tables, "unaligned_50.pkl"), use_bert=True)["test"]
    assert torch.equal(bert.lengths, ds.lengths) and bert.text_bert is not None
    for s in tables.values():
        del s["text_bert"]
    plain = _quiet(load_mmsa, _write(tmp_path, tables, "unaligned_50.pkl"))["test"]
    assert plain.lengths[:, 2].tolist() == [50] * len(ds)
    assert "unaligned" in repr(ds)
    batch = collate_sequences([ds[i] for i in range(len(ds))])
    assert batch["A"].shape == (4, 15, D_AUDIO) and batch["V"].shape == (4, 11, D_VISION)
    assert torch.equal(batch["lengths"], ds.lengths)
    # Time-averaged features use the valid frames only.
    mean = ds.mean_features()["A"]
    k = int(ds.lengths[0, 0])
    assert torch.allclose(mean[0], ds.A[0, :k].mean(0))


def test_val_key_accepted_and_list_arrays(tmp_path):
    tables = _tables()
    tables["val"] = tables.pop("valid")
    tables["train"]["regression_labels"] = tables["train"]["regression_labels"].reshape(-1, 1)  # (N, 1) is fine
    tables["train"]["id"] = list(tables["train"]["id"])  # a plain list of ids is fine
    out = _quiet(load_mmsa, _write(tmp_path, tables))
    assert len(out["val"]) == SIZES["valid"] and out["train"].labels.shape == (SIZES["train"],)


def _del(key, split="train"):
    def f(t):
        del t[split][key]
    return f


def _set(key, value_fn, split="train"):
    def f(t):
        t[split][key] = value_fn(t[split])
    return f


@pytest.mark.parametrize("mutate, match", [
    (lambda t: t.pop("valid"), "no split 'valid'"),
    (_del("vision"), "split 'train': no key 'vision'"),
    (_del("regression_labels", "test"), "split 'test': no key 'regression_labels'"),
    (_set("audio", lambda s: s["audio"][:, :, 0]), "key 'audio' must be \\(N, T, D\\)"),
    (_set("regression_labels", lambda s: s["regression_labels"][:-1]), "disagree on the number of samples"),
    (_set("text", lambda s: s["text"][:-1]), "disagree on the number of samples"),
    (_set("regression_labels", lambda s: np.where(np.arange(len(s["regression_labels"])) == 1, np.nan,
                                                   s["regression_labels"])), "'regression_labels' holds 1 non-finite"),
    (_set("vision", lambda s: np.where(np.arange(20) == 3, np.inf, s["vision"]).astype(np.float32)),
     "key 'vision' holds .* non-finite"),
    (_set("audio", lambda s: np.full_like(s["audio"], np.nan)), "key 'audio' holds .* non-finite"),
    (_set("text", lambda s: np.array(["x"] * len(s["text"]))), "key 'text' is not a numeric array"),
    (lambda t: t["train"].update(audio_lengths=[99] * SIZES["train"]), "key 'audio_lengths' has lengths in"),
    (lambda t: t["train"].update(vision_lengths=[1, 2]), "key 'vision_lengths' has 2 entries"),
    (lambda t: t.update(test="oops"), "split 'test' must be a dict"),
    (_set("id", lambda s: s["id"][:2]), "key 'id' has 2 entries"),
])
def test_format_errors_name_file_and_key(tmp_path, mutate, match):
    tables = _tables()
    mutate(tables)
    path = _write(tmp_path, tables)
    with pytest.raises(DataFormatError, match=match) as err:
        _quiet(load_mmsa, path)
    assert path in str(err.value)


def test_bert_errors_and_nonfinite_option(tmp_path):
    tables = _tables()
    del tables["valid"]["text_bert"]
    path = _write(tmp_path, tables)
    assert len(_quiet(load_mmsa, path)["val"]) == SIZES["valid"]  # text_bert is only needed with use_bert
    with pytest.raises(DataFormatError, match="split 'valid': no key 'text_bert'"):
        _quiet(load_mmsa, path, use_bert=True)
    tables = _tables()
    tables["test"]["text_bert"] = tables["test"]["text_bert"][:, :2]
    with pytest.raises(DataFormatError, match="'text_bert' must be \\(N, 3, T\\)"):
        _quiet(load_mmsa, _write(tmp_path, tables), use_bert=True)
    tables = _tables()
    tables["train"]["vision"][0, 0, 0] = np.nan
    tables["train"]["audio"][1, 2, 3] = np.inf
    out = _quiet(load_mmsa, _write(tmp_path, tables), nonfinite="zero")
    assert float(out["train"].V[0, 0, 0]) == 0.0 and float(out["train"].A[1, 2, 3]) == 0.0
    assert bool(torch.isfinite(out["train"].A).all())
    with pytest.raises(ValueError, match="nonfinite"):
        _quiet(load_mmsa, _write(tmp_path, tables), nonfinite="drop")


def test_not_a_dict_garbage_and_missing(tmp_path):
    with pytest.raises(DataFormatError, match="expected a dict with 'train', 'valid', 'test'"):
        _quiet(load_mmsa, _write(tmp_path, (1, 2, 3)))
    bad = os.path.join(tmp_path, "bad.pkl")
    with open(bad, "wb") as f:
        f.write(b"not a pickle at all")
    with pytest.raises(DataFormatError, match="cannot unpickle"):
        _quiet(load_mmsa, bad)
    with pytest.raises(DataFormatError, match="file not found"):
        load_mmsa(os.path.join(tmp_path, "nope.pkl"))
    tables = _tables()
    tables["test"]["vision"] = tables["test"]["vision"][:, :, :7]
    with pytest.raises(DataFormatError, match="split 'test' has dims"):
        _quiet(load_mmsa, _write(tmp_path, tables))


# ---------------------------------------------------------------------------------------------------------------------
# Safe copy
# ---------------------------------------------------------------------------------------------------------------------
def test_convert_round_trip_without_pickle(tmp_path, monkeypatch):
    path = _write(tmp_path, _tables(aligned=False), "unaligned_50.pkl")
    with pytest.warns(UnsafePickleWarning):
        assert convert_mmsa(path, tmp_path / "safe") == str(tmp_path / "safe")
    assert sorted(os.listdir(tmp_path / "safe")) == ["meta.json", "test.safetensors", "train.safetensors",
                                                     "val.safetensors"]
    meta = json.loads((tmp_path / "safe" / "meta.json").read_text())
    assert meta["sizes"] == {"train": 5, "val": 3, "test": 4} and meta["text_bert"] is True
    assert meta["aligned"] is False and meta["dims"] == [D_AUDIO, D_VISION, D_TEXT]
    direct = _quiet(load_mmsa, path, use_bert=True)

    def no_unpickling(*a, **k):
        raise AssertionError("the converted copy must load without unpickling")

    with monkeypatch.context() as mp, warnings.catch_warnings():
        mp.setattr(pickle, "load", no_unpickling)
        mp.setattr(pickle, "loads", no_unpickling)
        warnings.simplefilter("error")
        cached = load_dataset(f"mmsa-cache:{tmp_path / 'safe'}", use_bert=True)
        plain = load_mmsa_cache(tmp_path / "safe")
    for split in ("train", "val", "test"):
        _same(direct[split], cached[split])
        assert plain[split].text_bert is None and torch.equal(plain[split].L, direct[split].L)
    # The copy of a pickle without text_bert refuses use_bert.
    tables = _tables()
    for s in tables.values():
        del s["text_bert"]
    _quiet(convert_mmsa, _write(tmp_path, tables, "nobert.pkl"), tmp_path / "nobert")
    with pytest.raises(DataFormatError, match="no 'text_bert'"):
        load_mmsa_cache(tmp_path / "nobert", use_bert=True)


def test_converted_files_must_match(tmp_path):
    _quiet(convert_mmsa, _write(tmp_path, _tables(seed=1), "a.pkl"), tmp_path / "A")
    _quiet(convert_mmsa, _write(tmp_path, _tables(seed=2), "b.pkl"), tmp_path / "B")
    os.replace(tmp_path / "B" / "val.safetensors", tmp_path / "A" / "val.safetensors")
    with pytest.raises(DataFormatError, match="different conversions"):
        load_mmsa_cache(tmp_path / "A")
    with pytest.raises(DataFormatError, match="file not found"):
        load_mmsa_cache(tmp_path / "B")
    (tmp_path / "C").mkdir()
    (tmp_path / "C" / "meta.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(DataFormatError, match="not an MMSA cache"):
        load_mmsa_cache(tmp_path / "C")
    with pytest.raises(DataFormatError, match="meta.json: file not found"):
        load_mmsa_cache(tmp_path / "D")


def test_load_dataset_routes_mmsa(tmp_path):
    path = _write(tmp_path, _tables())
    with pytest.warns(UnsafePickleWarning):
        out = load_dataset(f"mmsa:{path}", fold=3, seed=7)
    _same(out["test"], _quiet(load_mmsa, path)["test"])
    with pytest.warns(UnsafePickleWarning):
        assert load_dataset(f"mmsa:{path}", use_bert=True)["train"].text_bert is not None
    for spec in ("mmsa", "mmsa-cache:"):
        with pytest.raises(DataFormatError, match="needs a path"):
            load_dataset(spec)


# ---------------------------------------------------------------------------------------------------------------------
# Container
# ---------------------------------------------------------------------------------------------------------------------
def _toy(n=6, t=7, text_bert=False):
    g = torch.Generator().manual_seed(0)
    return SequenceDataset(torch.randn(n, t, 2, generator=g), torch.randn(n, t, 3, generator=g),
                           torch.randn(n, t, 4, generator=g).double(), torch.linspace(-3, 3, n),
                           [f"s{i}" for i in range(n)], raw_text=[f"text {i}" for i in range(n)],
                           text_bert=torch.ones(n, 3, t) if text_bert else None)


def test_item_collate_subset_repr():
    ds = _toy()
    assert ds.L.dtype == torch.float32 and ds.lengths.tolist() == [[7, 7, 7]] * 6 and ds.names == ds.ids
    item = ds[-1]
    assert set(item) == {"A", "V", "L", "label", "index", "lengths"}
    assert item["index"] == 5 and item["label"].dim() == 0 and float(item["label"]) == 3.0
    assert item["A"].shape == (7, 2) and item["lengths"].tolist() == [7, 7, 7]
    with pytest.raises(IndexError):
        ds[6]
    batch = collate_sequences([ds[i] for i in (4, 1)])
    assert batch["A"].shape == (2, 7, 2) and batch["L"].shape == (2, 7, 4)
    assert batch["label"].dtype == torch.float32 and batch["label"].tolist() == [float(ds.labels[4]),
                                                                                 float(ds.labels[1])]
    assert batch["index"].tolist() == [4, 1] and batch["lengths"].shape == (2, 3)
    assert batch["missing_index"].tolist() == [[1, 1, 1]] * 2 and batch["condition"].tolist() == [6, 6]
    items = [dict(ds[i], missing_index=torch.tensor([1, 0, 0])) for i in range(3)]
    assert collate_sequences(items)["condition"].tolist() == [0, 0, 0]
    sub = ds.subset([5, 0])
    assert sub.ids == ["s5", "s0"] and sub.raw_text == ["text 5", "text 0"]
    assert torch.equal(sub.V[0], ds.V[5]) and float(sub.labels[0]) == 3.0
    assert repr(ds) == "SequenceDataset(n=6, seq_len=7, dims=(2, 3, 4), aligned, raw_text)"
    with pytest.raises(ValueError, match="empty"):
        collate_sequences([])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_sequences)
    assert [b["A"].shape[0] for b in loader] == [4, 2]


def test_validation_errors():
    a, v, l = torch.zeros(3, 4, 2), torch.zeros(3, 4, 3), torch.zeros(3, 4, 5)
    with pytest.raises(ValueError, match="disagree on the sample count"):
        SequenceDataset(a, v[:2], l, [0.0] * 3)
    with pytest.raises(ValueError, match="expected \\[N, T, D\\]"):
        SequenceDataset(a[:, :, 0], v, l, [0.0] * 3)
    with pytest.raises(ValueError, match="2 labels for 3 samples"):
        SequenceDataset(a, v, l, [0.0] * 2)
    with pytest.raises(ValueError, match="non-finite"):
        SequenceDataset(a, v, l, [0.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="lengths of modality V"):
        SequenceDataset(a, v, l, [0.0] * 3, lengths=[[4, 5, 4]] * 3)
    with pytest.raises(ValueError, match="lengths must be \\[N, 3\\]"):
        SequenceDataset(a, v, l, [0.0] * 3, lengths=[4, 4, 4])
    with pytest.raises(ValueError, match="text_bert"):
        SequenceDataset(a, v, l, [0.0] * 3, text_bert=torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match="ids for 3 samples"):
        SequenceDataset(a, v, l, [0.0] * 3, ["x"])


def test_save_load_atomic(tmp_path):
    ds = _toy(text_bert=True)
    target = tmp_path / "sub" / "toy.safetensors"
    ds.save(target)
    ds.save(target)  # overwriting goes through a temp file + rename: nothing else is left behind
    assert os.listdir(tmp_path / "sub") == ["toy.safetensors"]
    back = SequenceDataset.load(target)
    _same(ds, back)
    assert back.text_bert.dtype == torch.int64
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(DataFormatError, match="cannot read safetensors"):
        SequenceDataset.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "nope"})
    with pytest.raises(DataFormatError, match="not a SequenceDataset file"):
        SequenceDataset.load(tmp_path / "other.safetensors")


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------
def test_cli_convert_mmsa(tmp_path, capsys, monkeypatch):
    from mmer_ext.cli import main

    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, _tables())
    assert main(["convert", path, "safe"]) == 0, capsys.readouterr().err
    assert "mmsa-cache:safe" in capsys.readouterr().out
    _same(load_dataset("mmsa-cache:safe")["val"], _quiet(load_mmsa, path)["val"])
    assert main(["convert", path, "safe2", "--format", "mmsa"]) == 0
    assert load_mmsa_cache("safe2")["train"].ids == load_mmsa_cache("safe")["train"].ids
    # A pickle that is not in MMSA layout: one clear line, exit status 2.
    bad = _tables()
    del bad["test"]["vision"]
    _write(tmp_path, bad, "bad.pkl")
    capsys.readouterr()
    assert main(["convert", "bad.pkl", "safe3"]) == 2
    err = capsys.readouterr().err
    assert "split 'test': no key 'vision'" in err and "Traceback" not in err


def test_cli_convert_sniffs_dialogue_pickles(tmp_path, capsys, monkeypatch):
    """The dialogue path of ``convert`` is unchanged: a 9-tuple goes to the IEMOCAP-ERC converter."""
    from mmer_ext.cli import main
    from mmer_ext.cli.convert import sniff_pickle
    from mmer_ext.data import NonstandardSplitWarning, load_dialogue_dataset

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    vids = ["d0", "d1", "d2"]
    ids = {v: [f"{v}_{k}" for k in range(3)] for v in vids}
    tup = (ids, {v: ["M", "F", "M"] for v in vids}, {v: [0, 1, 2] for v in vids},
           {v: rng.standard_normal((3, 4)).astype(np.float32) for v in vids},
           {v: rng.standard_normal((3, 6)).astype(np.float32) for v in vids},
           {v: rng.standard_normal((3, 5)).astype(np.float32) for v in vids},
           {v: ["a", "b", "c"] for v in vids}, ["d0", "d1"], ["d2"])
    for proto in (0, 2, 4):
        path = os.path.join(tmp_path, f"IEMOCAP_features_{proto}.pkl")
        mpath = os.path.join(tmp_path, f"m{proto}.pkl")
        for p, obj in ((path, tup), (mpath, {"train": {}})):
            with open(p, "wb") as f:
                pickle.dump(obj, f, protocol=proto)
        assert sniff_pickle(path) == "dialogue" and sniff_pickle(mpath) == "mmsa"
    with pytest.warns(NonstandardSplitWarning):
        assert main(["convert", path, "dlg"]) == 0, capsys.readouterr().err
    assert "dialogues:dlg" in capsys.readouterr().out
    assert len(load_dialogue_dataset("dialogues:dlg", val_from="test")["test"]) == 1
    (tmp_path / "garbage.pkl").write_bytes(b"\xff\xfe")
    assert main(["convert", "garbage.pkl", "x"]) == 2
    assert "not a pickle file" in capsys.readouterr().err


@pytest.mark.parametrize("value", [3.5, -3.25])
def test_labels_outside_the_sentiment_scale_are_refused(tmp_path, value):
    tables = _tables()
    tables["valid"]["regression_labels"][2] = value
    path = _write(tmp_path, tables)
    with pytest.raises(DataFormatError, match=rf"split 'valid': key 'regression_labels': row 2 is {value}, "
                                              r"outside \[-3, 3\]"):
        _quiet(load_mmsa, path)
    with pytest.raises(DataFormatError, match="row 2"):
        _quiet(convert_mmsa, path, tmp_path / "safe")


def test_sample_ids_twice_or_in_two_splits_are_refused(tmp_path):
    tables = _tables()
    ids = tables["test"]["id"].tolist()
    ids[2] = tables["train"]["id"][3]  # a list: assigning into the fixed-width str array would truncate the id
    tables["test"]["id"] = ids
    leaked = re.escape(tables["train"]["id"][3])
    with pytest.raises(DataFormatError, match=rf"sample id '{leaked}' is in both train and test"):
        _quiet(load_mmsa, _write(tmp_path, tables))
