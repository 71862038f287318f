"""Real-feature loaders: tiny files written in exactly the MMIN / IF-MMIN / NMER layout, then loaded back."""

from __future__ import annotations

import json
import warnings
import shutil

import numpy as np
import pytest
import torch

from mmer_ext.data import DataFormatError, ModalityDims, load_dataset, load_iemocap, load_msp_improv

h5py = pytest.importorskip("h5py")

DIMS = ModalityDims(130, 342, 1024)
NAMES = {
    "trn": ["Ses02F_impro01_F000", "Ses02F_impro01_M001", "Ses03M_script01_1_F002", "Ses03M_script01_1_M003"],
    "val": ["Ses01F_impro02_F000", "Ses01F_impro02_M001"],
    "tst": ["Ses01M_script02_2_F010", "Ses01M_script02_2_M011"],
}
LABELS = {"trn": [0, 3, 1, 2], "val": [2, 0], "tst": [3, 1]}
ALL = [n for s in NAMES.values() for n in s]


def _features(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {m: {} for m in "AVL"}
    for i, name in enumerate(ALL):
        out["A"][name] = (rng.normal(size=(6 + i, DIMS.A)) * 3 + 5).astype(np.float32)
        out["V"][name] = rng.normal(size=(4 + i % 3, DIMS.V)).astype(np.float32)
        out["L"][name] = rng.normal(size=(5 + i % 4, DIMS.L)).astype(np.float32)
    return out


def _write_h5(path, feats):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for name, x in feats.items():
            f[name] = x


def _write_layout(root, kind="iemocap", folds=(1, 2)):
    """feature_root = root/features, target_root = root/targets, config at root/config.json (relative paths)."""
    feats = _features()
    froot, troot = root / "features", root / "targets"
    a_name = "comparE.h5" if kind == "iemocap" else "comparE_raw.h5"
    _write_h5(froot / "A" / a_name, feats["A"])
    _write_h5(froot / "V" / "denseface.h5", feats["V"])
    _write_h5(froot / "L" / "bert_large.h5", feats["L"])
    stats = {}
    if kind == "iemocap":
        with h5py.File(froot / "A" / "comparE_mean_std.h5", "w") as f:
            for cv in folds:
                mean = np.full(DIMS.A, 5.0 + cv, dtype=np.float32)
                std = np.full(DIMS.A, 2.0 * cv, dtype=np.float32)
                std[7] = 0.0  # a constant feature: the loader must divide by 1, not 0
                f[f"{cv}/mean"] = mean
                f[f"{cv}/std"] = std
                stats[cv] = (mean, std)
    for cv in folds:
        d = troot / str(cv)
        d.mkdir(parents=True)
        for split, names in NAMES.items():
            lab = np.array(LABELS[split])
            if kind == "iemocap":
                np.save(d / f"{split}_label.npy", np.eye(4, dtype=np.float32)[lab])
                np.save(d / f"{split}_int2name.npy", np.array([[n.encode()] for n in names]))  # (N, 1) bytes
            else:
                np.save(d / f"{split}_label.npy", lab.astype(np.int64))
                np.save(d / f"{split}_int2name.npy", np.array(names))  # plain str
    total_cv = 10 if kind == "iemocap" else 12
    (root / "config.json").write_text(json.dumps(
        {"feature_root": "features", "target_root": "targets", "total_cv": total_cv}))
    return feats, stats


@pytest.fixture
def iemocap(tmp_path):
    feats, stats = _write_layout(tmp_path)
    return tmp_path, feats, stats


def test_load_iemocap_layout_and_trn_norm(iemocap):
    root, feats, stats = iemocap
    splits = load_iemocap(root / "config.json", cv=2)
    assert set(splits) == {"train", "val", "test"}
    mean, std = stats[2]
    std = np.where(std == 0, 1.0, std)
    for key, split in (("train", "trn"), ("val", "val"), ("test", "tst")):
        ds = splits[key]
        assert ds.names == NAMES[split]  # bytes decoded, order kept
        assert ds.labels.tolist() == LABELS[split]  # one-hot -> argmax
        assert ds.dims == DIMS and ds.class_names == ("happy", "angry", "sad", "neutral")
        for i, name in enumerate(ds.names):
            expected_a = (feats["A"][name] - mean) / std
            np.testing.assert_allclose(ds.A[i].numpy(), expected_a, rtol=1e-6, atol=1e-6)
            assert torch.equal(ds.V[i], torch.from_numpy(feats["V"][name]))  # V and L raw
            assert torch.equal(ds.L[i], torch.from_numpy(feats["L"][name]))
    # Column 7 has std 0 -> divided by 1.
    name = NAMES["trn"][0]
    np.testing.assert_allclose(splits["train"].A[0][:, 7].numpy(), feats["A"][name][:, 7] - mean[7], rtol=1e-6)


def test_path_forms_and_fold_stats(iemocap, tmp_path_factory):
    root, feats, stats = iemocap
    by_dir = load_iemocap(root, cv=1, splits=("tst",))  # directory holding config.json
    assert set(by_dir) == {"test"}
    name = NAMES["tst"][0]
    mean, std = stats[1]
    np.testing.assert_allclose(by_dir["test"].A[0][:, 0].numpy(), (feats["A"][name][:, 0] - mean[0]) / std[0],
                               rtol=1e-6)
    # A feature root with A/ V/ L/ and target/.
    other = tmp_path_factory.mktemp("flat")
    shutil.copytree(root / "features", other, dirs_exist_ok=True)
    shutil.copytree(root / "targets", other / "target")
    flat = load_iemocap(other, cv=1, splits=("trn", "val"))
    assert flat["train"].names == NAMES["trn"] and len(flat["val"]) == 2
    via_spec = load_dataset(f"iemocap:{root / 'config.json'}", cv=1)
    assert set(via_spec) == {"train", "val", "test"} and via_spec["test"].names == NAMES["tst"]


def test_utt_norm(iemocap):
    root, feats, _ = iemocap
    ds = load_iemocap(root, cv=1, splits=("trn",), norm_method="utt")["train"]
    a = ds.A[1]
    assert torch.allclose(a.mean(0), torch.zeros(DIMS.A), atol=1e-5)
    assert torch.allclose(a.std(0), torch.ones(DIMS.A), atol=1e-4)


def test_msp_improv(tmp_path):
    feats, _ = _write_layout(tmp_path, kind="msp", folds=(12,))
    splits = load_msp_improv(tmp_path, cv=12)
    assert splits["val"].names == NAMES["val"] and splits["val"].labels.tolist() == LABELS["val"]
    # Normalised with mean/std over all frames of all utterances: pooled frames are standardised.
    pooled = torch.cat([x for ds in splits.values() for x in ds.A])
    assert torch.allclose(pooled.mean(0), torch.zeros(DIMS.A), atol=1e-4)
    assert torch.allclose(pooled.std(0, unbiased=False), torch.ones(DIMS.A), atol=1e-4)
    assert load_dataset(f"msp:{tmp_path}", cv=12, splits=("val",))["val"].names == NAMES["val"]
    with pytest.raises(DataFormatError, match="out of range"):
        load_msp_improv(tmp_path, cv=13)


def test_error_missing_file(iemocap):
    root, _, _ = iemocap
    (root / "features" / "V" / "denseface.h5").unlink()
    with pytest.raises(DataFormatError, match="denseface.h5"):
        load_iemocap(root)
    with pytest.raises(DataFormatError, match="no such file"):
        load_iemocap(root / "nope.json")


def test_error_missing_utterance(iemocap):
    root, _, _ = iemocap
    np.save(root / "targets" / "1" / "val_int2name.npy", np.array([[b"Ses01F_impro02_F000"], [b"Ses09X_ghost_M999"]]))
    with pytest.raises(DataFormatError, match="Ses09X_ghost_M999") as exc:
        load_iemocap(root, cv=1)
    assert "comparE.h5" in str(exc.value)


def test_error_wrong_dim(iemocap):
    root, feats, _ = iemocap
    bad = {n: x[:, :341] for n, x in feats["V"].items()}
    (root / "features" / "V" / "denseface.h5").unlink()
    _write_h5(root / "features" / "V" / "denseface.h5", bad)
    with pytest.raises(DataFormatError, match=r"denseface\.h5.*342"):
        load_iemocap(root)


def test_error_fold_out_of_range(iemocap):
    root, _, _ = iemocap
    for cv in (0, 11):
        with pytest.raises(DataFormatError, match="out of range"):
            load_iemocap(root, cv=cv)
    with pytest.raises(DataFormatError, match="no group '3'"):  # in range, but no statistics for that fold
        load_iemocap(root, cv=3)


def test_error_count_mismatch(iemocap):
    root, _, _ = iemocap
    np.save(root / "targets" / "1" / "tst_int2name.npy", np.array([[b"Ses01M_script02_2_F010"]]))
    with pytest.raises(DataFormatError, match="1 names but .* 2 labels"):
        load_iemocap(root, cv=1)


def test_error_bad_label_shape(iemocap):
    root, _, _ = iemocap
    np.save(root / "targets" / "1" / "trn_label.npy", np.zeros((4, 3), dtype=np.float32))
    with pytest.raises(DataFormatError, match=r"trn_label\.npy.*bad label shape"):
        load_iemocap(root, cv=1)
    np.save(root / "targets" / "1" / "trn_label.npy", np.array([0, 1, 2, 3]))  # ints where one-hot is expected
    with pytest.raises(DataFormatError, match="one-hot"):
        load_iemocap(root, cv=1)


def test_error_bad_directory(tmp_path):
    with pytest.raises(DataFormatError, match="config"):
        load_iemocap(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"feature_root": "x"}))
    with pytest.raises(DataFormatError, match="target_root"):
        load_iemocap(tmp_path)


@pytest.mark.parametrize("model", ["mmin", "nmer"])
def test_cli_trains_and_evaluates_on_the_real_layout(tmp_path, capsys, monkeypatch, model):
    """The whole path a user with the real features takes: train on fold 2 from the config JSON, then evaluate."""
    from mmer_ext.cli import main

    _write_layout(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    config = tmp_path / "data" / "config.json"
    argv = ["train", "--model", model, "--data", f"iemocap:{config}", "--fold", "2", "--epochs", "1",
            "--batch-size", "2", "--out", "run", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["sizes"] == {"train": 4, "val": 2, "test": 2} and run["dims"] == list(DIMS)
    assert saved["metrics"]["{a,v,l}"]["WA"] in (0.0, 0.5, 1.0)
    capsys.readouterr()
    assert main(["evaluate", "run/model.safetensors", "--json", "--device", "cpu"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again == saved["metrics"]
    # Another fold's split files are used when asked for; a fold that is not there is a clear error.
    assert main(["evaluate", "run/model.safetensors", "--fold", "7", "--device", "cpu"]) == 2
    assert "7" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ bad content, named precisely
def _fold(root):
    return root / "targets" / "1"


@pytest.mark.parametrize("row, match", [
    ([0, 0, 0, 0], r"row 1 is \[0.0, 0.0, 0.0, 0.0\], not one-hot"),
    ([np.nan, 1, 0, 0], "row 1 holds NaN"),
    ([1, 1, 0, 0], r"row 1 is \[1.0, 1.0, 0.0, 0.0\], not one-hot"),
    ([-1, 0, 0, 0], "row 1 .* not one-hot"),
    ([0, 2, 0, 0], "row 1 .* not one-hot"),
])
def test_labels_that_are_not_one_class_are_refused(iemocap, row, match):
    root, _, _ = iemocap
    lab = np.eye(4, dtype=np.float32)[LABELS["trn"]]
    lab[1] = row
    np.save(_fold(root) / "trn_label.npy", lab)
    with pytest.raises(DataFormatError, match="trn_label.npy: " + match):
        load_iemocap(root, cv=1)


def test_duplicate_and_leaked_ids_are_refused(iemocap):
    root, _, _ = iemocap
    names = list(NAMES["trn"])
    names[2] = names[0]
    np.save(_fold(root) / "trn_int2name.npy", np.array([[n.encode()] for n in names]))
    with pytest.raises(DataFormatError, match=rf"'{names[0]}' is listed twice in trn_int2name.npy \(rows 0 and 2\)"):
        load_iemocap(root, cv=1)
    names = list(NAMES["tst"])
    names[1] = NAMES["trn"][3]
    np.save(_fold(root) / "trn_int2name.npy", np.array([[n.encode()] for n in NAMES["trn"]]))
    np.save(_fold(root) / "tst_int2name.npy", np.array([[n.encode()] for n in names]))
    with pytest.raises(DataFormatError, match=rf"'{names[1]}' is in both trn_int2name.npy and tst_int2name.npy"):
        load_iemocap(root, cv=1)


@pytest.mark.parametrize("modality, file", [("A", "comparE.h5"), ("V", "denseface.h5"), ("L", "bert_large.h5")])
def test_zero_frames_and_nan_features_are_refused(tmp_path, modality, file):
    _write_layout(tmp_path)
    name = NAMES["val"][1]
    dim = DIMS[("A", "V", "L").index(modality)]
    with h5py.File(tmp_path / "features" / modality / file, "a") as f:
        del f[name]
        f[name] = np.zeros((0, dim), np.float32)
    with pytest.raises(DataFormatError, match=rf"{file}: utterance '{name}': the utterance has 0 frames"):
        load_iemocap(tmp_path, cv=1)
    bad = np.ones((5, dim), np.float32)
    bad[3, 7] = np.inf
    with h5py.File(tmp_path / "features" / modality / file, "a") as f:
        del f[name]
        f[name] = bad
    with pytest.raises(DataFormatError, match=rf"{file}: utterance '{name}': frame 3 holds NaN or infinite"):
        load_iemocap(tmp_path, cv=1)


@pytest.mark.parametrize("key", ["mean", "std"])
def test_nonfinite_fold_statistics_are_refused(iemocap, key):
    root, _, _ = iemocap
    with h5py.File(root / "features" / "A" / "comparE_mean_std.h5", "a") as f:
        values = f[f"1/{key}"][()]
        values[11] = np.nan
        del f[f"1/{key}"]
        f[f"1/{key}"] = values
    with pytest.raises(DataFormatError, match=rf"comparE_mean_std.h5: 1/{key}: feature 11 holds NaN"):
        load_iemocap(root, cv=1)
    assert load_iemocap(root, cv=2)["train"].dims == DIMS  # the other fold's statistics are fine


def test_truncated_files_are_named(iemocap):
    root, _, _ = iemocap
    label = _fold(root) / "val_label.npy"
    label.write_bytes(label.read_bytes()[:-9])
    with pytest.raises(DataFormatError, match="val_label.npy: cannot read .npy, truncated"):
        load_iemocap(root, cv=1)
    label.write_bytes(b"\x93NUMPY")
    with pytest.raises(DataFormatError, match="val_label.npy: not a readable .npy"):
        load_iemocap(root, cv=1)
    np.save(label, np.eye(4, dtype=np.float32)[LABELS["val"]])
    h5 = root / "features" / "V" / "denseface.h5"
    h5.write_bytes(h5.read_bytes()[: h5.stat().st_size // 2])
    with pytest.raises(DataFormatError, match="denseface.h5: .*truncated or damaged"):
        load_iemocap(root, cv=1)


class _WritesMarker:
    """An object whose unpickling runs code: what a malicious int2name.npy would hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_names_are_read_without_pickle_and_object_arrays_warn(iemocap):
    from mmer_ext.data import UnsafePickleWarning

    root, _, _ = iemocap
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bytes (N, 1) names: no pickle, so no warning
        assert load_iemocap(root, cv=1)["train"].names == NAMES["trn"]
    marker = root / "code-ran"
    names = np.empty(len(NAMES["trn"]), dtype=object)
    names[:] = [_WritesMarker(marker)] + NAMES["trn"][1:]
    np.save(_fold(root) / "trn_int2name.npy", names, allow_pickle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsafePickleWarning)
        with pytest.raises(UnsafePickleWarning, match="trn_int2name.npy: reading a pickle file executes"):
            load_iemocap(root, cv=1)
    assert not marker.exists()  # refused before unpickling when warnings are errors
    with pytest.warns(UnsafePickleWarning, match="trn_int2name.npy"), pytest.raises(DataFormatError, match="row 0"):
        load_iemocap(root, cv=1)  # let through: it warns first, and the non-name is still refused
    names[:] = NAMES["trn"]  # Python str objects: a pickle, but a harmless one
    np.save(_fold(root) / "trn_int2name.npy", names, allow_pickle=True)
    with pytest.warns(UnsafePickleWarning):
        assert load_iemocap(root, cv=1)["train"].names == NAMES["trn"]
