"""The command line: train / evaluate / demo from a fresh process, and clear one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_data import TINY
from mmer_ext.cli import main

DATA_FLAGS = [arg for k, v in TINY.items() for arg in ("--set", f"data_options.{k}={v}")]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "mmer_ext", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_train_then_evaluate(tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "cfg.yaml"
    config.write_text("model: ifmmin\nepochs: 1\nbatch_size: 32\nprogress: false\n")
    proc = _run(["train", "--config", str(config), "--out", str(out), "--device", "cpu", *DATA_FLAGS], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "{a,v,l}" in proc.stdout and "model.safetensors" in proc.stdout
    saved = json.loads((out / "test_metrics.json").read_text())["metrics"]

    proc = _run(["evaluate", str(out / "model.safetensors"), "--json", "--device", "cpu"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == saved  # the data are regenerated from the config stored in the model file
    assert (out / "confusion_matrices.png").is_file() and (out / "eval-test-zero-confusion.png").is_file()

    proc = _run(["evaluate", str(out / "model.safetensors"), "--corruption", "gaussian", "--noise-steps", "20"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "average" in proc.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--set", "epoch=2"], "epoch"),
        (["train", "--config", "missing.yaml"], "does not exist"),
        (["train", "--data", "iemocap:/nonexistent/path", "--epochs", "1"], "/nonexistent/path"),
        (["train", "--data", "imagenet", "--epochs", "1"], "imagenet"),
        (["evaluate", "nope.safetensors"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith(f"mmer-ext {argv[0]}: error:")


@pytest.mark.parametrize("argv", [["train", "--model", "gcn"], ["train", "--epochs", "two"], ["frobnicate"]])
def test_argparse_rejects_bad_flags(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err or "invalid int" in err


def test_evaluate_rejects_data_of_other_dims(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", "baseline", "--epochs", "1", "--batch-size", "32", "--no-progress",
                 "--out", "run", "--device", "cpu", *DATA_FLAGS]) == 0
    capsys.readouterr()
    assert main(["evaluate", "run/model.safetensors", "--data", "synthetic:iemocap", "--device", "cpu"]) == 2
    assert "feature dims" in capsys.readouterr().err


def test_quick_demo_writes_every_artefact(tmp_path):
    proc = _run(["demo", "--quick", "--out", str(tmp_path / "demo"), "--no-progress", "--device", "cpu"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "demo"
    for name in ("report.md", "results.csv", "results.json", "ua_per_condition.png", "mmin_embeddings.png",
                 "mmgcn_results.csv", "imder_results.csv", "results_per_seed.csv", "ua_seed_spread.png",
                 "confusion_mmin.png", "confusion_nmer.png", "mmgcn_confusion.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    for model in ("full-modality baseline", "augmented baseline", "MMIN", "IF-MMIN", "NMER"):
        assert model in report
    assert "## MMGCN on synthetic dialogues" in report and "Per-class F1" in report
    assert "hypothesis" in report.lower()
    results = json.loads((out / "results.json").read_text())
    assert set(results["tables"]["zero"]) == {"full-modality baseline", "augmented baseline", "MMIN", "IF-MMIN", "NMER"}
    assert (out / "ua_per_condition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(results["dialogues"]["metrics"]) >= {"{a}", "average", "{a,v,l}"}
    assert "## IMDer on synthetic MOSI-like sequences" in report and "MR=0.7" in report
    assert {f"MR={mr / 10:.1f}" for mr in range(8)} <= set(results["imder"]["metrics"])
    # the recovery comparison (zero-fill / ridge / diffusion) and its two pictures
    assert set(results["imder"]["recovery"]) == {"zero-fill", "ridge", "diffusion ddim:3:eta=0.5"}
    assert results["imder"]["sampler"] == "ddim:3:eta=0.5"
    assert "| ridge |" in report and "imder_recovery_heatmaps.png" in report and "imder_recovery_pca.png" in report
    for name in ("imder_recovery_heatmaps.png", "imder_recovery_pca.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The utterance models over seeds: per-seed metrics, their mean in the table, the paired tests of the orderings.
    assert results["seeds"] == [0, 1]
    per_seed = results["tables_per_seed"]["zero"]["MMIN"]
    assert len(per_seed) == 2 and "confusion" in per_seed[0]
    mean_ua = (per_seed[0]["average"]["UA"] + per_seed[1]["average"]["UA"]) / 2
    assert abs(results["tables"]["zero"]["MMIN"]["average"]["UA"] - mean_ua) < 1e-12
    assert len(results["orderings"]["zero"]) == 10  # every pair of the five models
    assert "## Which orderings are significant" in report and "±" in report
    assert "paired t-test" in report
