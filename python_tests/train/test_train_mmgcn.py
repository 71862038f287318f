"""MMGCN through the trainer and the CLI: dialogue batches, WF1 selection, six conditions, reload, the authors'
select-on-test protocol."""

from __future__ import annotations

import json

import pytest

from mmer_ext.cli import main
from mmer_ext.data import CONDITION_LABELS, make_synthetic_dialogues
from mmer_ext.train import evaluate_model, fit, load_config, load_model

SMALL = {"preset": "small", "n_dialogues_train": 8, "n_val": 3, "n_test": 3}
SHALLOW = ["hparams.main.num_layers=4"]


def test_fit_mmgcn_on_synthetic_dialogues(tmp_path):
    splits = make_synthetic_dialogues(seed=0, **SMALL)
    cfg = load_config(None, SHALLOW, model="mmgcn", data="synthetic-dialogue", data_options=SMALL,
                      out_dir=str(tmp_path), epochs=2, batch_size=4, progress=False)
    result = fit(cfg, splits=splits, log=lambda m: None)
    assert result.stages[0].name == "main" and result.stages[0].best_epoch in (1, 2)
    metrics = result.test_metrics
    assert len(metrics.pop("per_class_F1")) == splits["test"].num_classes == 6
    confusion = metrics.pop("confusion")
    assert set(confusion) == set(CONDITION_LABELS) | {"overall"}
    assert all(len(confusion[c]) == 6 and all(len(r) == 6 for r in confusion[c]) for c in confusion)
    # Every test utterance is counted once per condition.
    assert sum(map(sum, confusion["{a,v,l}"])) == splits["test"].num_utterances
    assert (tmp_path / "confusion_matrices.png").is_file()
    assert set(metrics) == set(CONDITION_LABELS) | {"average", "overall"}
    model, meta = load_model(tmp_path / "model.safetensors")
    assert meta["data_kwargs"] == {"num_speakers": splits["train"].num_speakers}
    assert evaluate_model(model, splits["test"], num_classes=6) == metrics
    history = json.loads((tmp_path / "main" / "done.json").read_text())["history"]
    assert {"WF1", "UA"} <= set(history[0]["val"])  # selected on weighted F1 (the recipe's select_metric)


def test_cli_mmgcn_and_the_select_on_test_protocol(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["train", "--model", "mmgcn", "--data", "synthetic-dialogue", "--epochs", "1", "--batch-size", "4",
              "--device", "cpu", "--no-progress", "--set", SHALLOW[0]]
    for key, value in SMALL.items():
        common += ["--set", f"data_options.{key}={value}"]
    assert main([*common, "--out", "val"]) == 0, capsys.readouterr().err
    assert main([*common, "--out", "test", "--select-on-test"]) == 0, capsys.readouterr().err
    sizes = {name: json.loads((tmp_path / name / "run.json").read_text())["sizes"] for name in ("val", "test")}
    assert sizes["val"]["val"] == 3 and sizes["test"]["val"] == sizes["test"]["test"] == 3
    capsys.readouterr()
    assert main(["evaluate", "val/model.safetensors", "--json", "--device", "cpu"]) == 0
    assert "{a,v,l}" in json.loads(capsys.readouterr().out)
    header = (tmp_path / "val" / "eval-test-zero.csv").read_text().splitlines()[0]
    assert "{a,v,l} WF1" in header
    assert "{a,v,l} WF1" in (tmp_path / "val" / "eval-test-zero.md").read_text()


def test_select_on_test_needs_dialogue_data(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--model", "baseline", "--epochs", "1", "--select-on-test", "--no-progress",
                 "--set", "data_options.preset=small"])
    assert code == 2
    assert "val_from" in capsys.readouterr().err
