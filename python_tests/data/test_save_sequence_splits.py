"""save_sequence_splits: in-memory SequenceDataset splits in convert_mmsa's format (``mmsa-cache:DIR``)."""

from __future__ import annotations

import json

import pytest
import torch

from mmer_ext.data import SequenceDataset, load_dataset, load_mmsa_cache, save_sequence_splits


def _split(n: int, seed: int, bert: bool = False, d_v: int = 4) -> SequenceDataset:
    g = torch.Generator().manual_seed(seed)
    text_bert = torch.randint(0, 100, (n, 3, 6), generator=g) if bert else None
    return SequenceDataset(torch.randn(n, 5, 3, generator=g), torch.randn(n, 7, d_v, generator=g),
                           torch.randn(n, 6, 8, generator=g), torch.rand(n, generator=g) * 6 - 3,
                           lengths=torch.tensor([[5, 7, 6]] * n), text_bert=text_bert)


def _assert_same(a: SequenceDataset, b: SequenceDataset) -> None:
    for m in "AVL":
        assert torch.equal(a.features[m], b.features[m])
    assert torch.equal(a.labels, b.labels) and torch.equal(a.lengths, b.lengths) and a.ids == b.ids


@pytest.mark.parametrize("bert", [False, True])
def test_round_trip(tmp_path, bert):
    splits = {"train": _split(6, 0, bert), "val": _split(2, 1, bert), "test": _split(3, 2, bert)}
    assert save_sequence_splits(splits, tmp_path, source="mine") == str(tmp_path)
    loaded = load_dataset(f"mmsa-cache:{tmp_path}")
    for name, ds in splits.items():
        _assert_same(ds, loaded[name])
        assert loaded[name].text_bert is None  # dropped unless asked for
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["text_bert"] is bert and meta["source"] == "mine" and meta["sizes"] == {"train": 6, "val": 2, "test": 3}
    assert meta["aligned"] is False and meta["seq_len"] == [5, 7, 6]
    if bert:
        assert torch.equal(load_mmsa_cache(tmp_path, use_bert=True)["test"].text_bert, splits["test"].text_bert)


def test_text_bert_only_when_every_split_has_it(tmp_path):
    save_sequence_splits({"train": _split(4, 0, True), "val": _split(2, 1), "test": _split(2, 2, True)}, tmp_path)
    assert json.loads((tmp_path / "meta.json").read_text())["text_bert"] is False
    assert load_mmsa_cache(tmp_path)["train"].text_bert is None


@pytest.mark.parametrize(
    "splits, match",
    [
        (lambda: {"train": _split(2, 0), "test": _split(2, 1)}, "exactly"),
        (lambda: {"train": _split(2, 0), "valid": _split(2, 1), "test": _split(2, 2)}, "exactly"),
        (lambda: {"train": _split(2, 0), "val": _split(2, 1, d_v=5), "test": _split(2, 2)}, "dims"),
        (lambda: {"train": _split(2, 0), "val": [1, 2], "test": _split(2, 2)}, "SequenceDataset"),
    ],
)
def test_bad_splits(tmp_path, splits, match):
    with pytest.raises(ValueError, match=match):
        save_sequence_splits(splits(), tmp_path)
    assert not (tmp_path / "meta.json").exists()
