"""The synthetic MOSI-like sentiment sequences: shapes, determinism, label distribution, temporal structure, and a
calibration check with linear probes (informative modalities, text most; modalities recoverable from each other)."""

from __future__ import annotations

import pytest
import torch

from mmer_ext.data import (
    SEQUENCE_PRESETS,
    DataFormatError,
    SequenceDataset,
    load_dataset,
    make_synthetic_sequences,
    regression_calibration_report,
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def calib():
    # Larger than the small preset's train split so the probes' numbers are stable; generation takes well under 1 s.
    return regression_calibration_report(make_synthetic_sequences("small", seed=0, sizes=(2000, 10, 1000)))


def test_presets_shapes():
    assert SEQUENCE_PRESETS["mosi"]["sizes"] == (1284, 229, 686)
    assert tuple(SEQUENCE_PRESETS["mosi"]["dims"]) == (5, 20, 768)
    out = make_synthetic_sequences("mosi", sizes=(3, 2, 1))
    assert list(out) == ["train", "val", "test"] and [len(d) for d in out.values()] == [3, 2, 1]
    ds = out["train"]
    assert isinstance(ds, SequenceDataset) and ds.dims == (5, 20, 768) and ds.seq_len == (50, 50, 50)
    assert ds.A.shape == (3, 50, 5) and ds.V.shape == (3, 50, 20) and ds.L.shape == (3, 50, 768)
    assert ds.aligned and ds.task == "regression" and ds.ids[0] == "synmosi_train_00000"
    assert all(ds.features[m].dtype == torch.float32 for m in "AVL") and ds.labels.dtype == torch.float32
    small = make_synthetic_sequences("small", seed=1)
    assert [len(d) for d in small.values()] == [400, 100, 200] and small["test"].dims == (5, 20, 32)
    custom = make_synthetic_sequences("small", sizes=(2, 0, 1), seq_len=9, dims=(3, 4, 6))["train"]
    assert custom.A.shape == (2, 9, 3) and custom.L.shape == (2, 9, 6)
    assert len(make_synthetic_sequences("small", sizes=(2, 0, 1))["val"]) == 0


def test_deterministic_and_split_streams():
    a = make_synthetic_sequences("small", seed=5, sizes=(20, 6, 8))
    b = make_synthetic_sequences("small", seed=5, sizes=(20, 6, 8))
    c = make_synthetic_sequences("small", seed=6, sizes=(20, 6, 8))
    d = make_synthetic_sequences("small", seed=5, sizes=(50, 6, 8))
    for s in ("train", "val", "test"):
        for m in "AVL":
            assert torch.equal(a[s].features[m], b[s].features[m])
        assert torch.equal(a[s].labels, b[s].labels)
        assert not torch.equal(a[s].L, c[s].L)
    # The validation / test sets do not depend on the training-set size.
    for s in ("val", "test"):
        assert torch.equal(a[s].L, d[s].L) and torch.equal(a[s].labels, d[s].labels)


def test_label_distribution():
    y = make_synthetic_sequences("small", seed=2, sizes=(0, 0, 20000), seq_len=2, dims=(1, 1, 1))["test"].labels
    assert float(y.min()) == -3.0 and float(y.max()) == 3.0
    assert torch.equal(torch.round(y * 5), y * 5)  # mean of five annotators' integer scores: steps of 0.2
    assert abs(float(y.mean())) < 0.05 and 1.3 < float(y.std()) < 1.7
    zero = float((y == 0).float().mean())
    near = float((y.abs() <= 0.5).float().mean())
    assert 0.01 < zero < 0.08  # the Acc-2 non0 subset keeps more than 92 % of the samples
    assert 0.12 < near < 0.3
    cont = make_synthetic_sequences("small", seed=2, sizes=(0, 0, 2000), seq_len=2, dims=(1, 1, 1),
                                    annotators=0)["test"].labels
    assert float((cont == 0).float().mean()) == 0.0 and cont.abs().max() <= 3.0


def test_temporal_structure():
    ds = make_synthetic_sequences("small", seed=0, sizes=(300, 0, 0))["train"]
    for m in "AVL":
        x = ds.features[m] - ds.features[m].mean(1, keepdim=True)
        var = (x * x).mean()

        def ac(lag):
            return float((x[:, lag:] * x[:, :-lag]).mean() / var)

        assert ac(1) > 0.2 and ac(1) > ac(10) + 0.2, m  # smooth trajectory + white frame noise


def test_calibration_probes(calib):
    mean = calib["mae_mean"]
    assert calib["mae_full"] < 0.7 * mean
    for m in "AVL":
        assert calib[f"mae_{m}"] < 0.97 * mean, m  # every modality carries part of the label
    assert calib["mae_L"] < calib["mae_A"] - 0.1 and calib["mae_L"] < calib["mae_V"] - 0.1  # text most
    assert calib["mae_full"] < calib["mae_L"]  # fusion helps
    for m in "AVL":
        assert 0.2 < calib[f"frame_r2_{m}"] < 0.7, m  # partly, not fully, recoverable from the other two


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown preset"):
        make_synthetic_sequences("mosei")
    with pytest.raises(ValueError, match="sizes"):
        make_synthetic_sequences("small", sizes=(1, 2))
    with pytest.raises(ValueError, match="seq_len"):
        make_synthetic_sequences("small", seq_len=0)
    with pytest.raises(ValueError, match="dims"):
        make_synthetic_sequences("small", dims=(0, 2, 3))
    with pytest.raises(ValueError, match="latent_dim"):
        make_synthetic_sequences("small", latent_dim=1)


def test_load_dataset_routes_synthetic():
    direct = make_synthetic_sequences("small", seed=3)
    routed = load_dataset("synthetic-mosi-small", seed=3, fold=2)
    assert torch.equal(direct["test"].L, routed["test"].L) and torch.equal(direct["val"].labels,
                                                                          routed["val"].labels)
    assert torch.equal(load_dataset("synthetic-mosi:small", seed=3)["train"].A, direct["train"].A)
    mosi = load_dataset("synthetic-mosi", seed=1, sizes=(2, 1, 1))
    assert mosi["train"].dims == (5, 20, 768)
    with pytest.raises(DataFormatError, match="takes no ':' argument"):
        load_dataset("synthetic-mosi-small:x")
    with pytest.raises(DataFormatError, match="synthetic-mosi"):
        load_dataset("mosi:somewhere")
