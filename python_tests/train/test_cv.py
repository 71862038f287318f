"""Cross-validation and seed repeats (``--folds`` / ``--seeds``): per-run rows, the mean ± std table, the figure,
and a killed cross-validation that resumes at the run and epoch it stopped."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tiny_data import TINY
from mmer_ext.cli import main
from mmer_ext.train import ConfigError, load_config
from mmer_ext.train.cv import aggregate_metrics, cv_runs, parse_folds, parse_seeds, run_label

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from test_data_iemocap import _write_layout  # noqa: E402  (the IEMOCAP-layout writer of the loader tests)

DATA_FLAGS = [arg for k, v in TINY.items() for arg in ("--set", f"data_options.{k}={v}")]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_parse_folds_and_seeds(tmp_path):
    _write_layout(tmp_path / "iemocap", folds=(1,))
    _write_layout(tmp_path / "msp", kind="msp", folds=(1,))
    assert parse_folds("all", f"iemocap:{tmp_path / 'iemocap'}") == list(range(1, 11))
    assert parse_folds("all", f"msp:{tmp_path / 'msp'}") == list(range(1, 13))
    assert parse_folds("1,3-5", f"iemocap:{tmp_path / 'iemocap'}") == [1, 3, 4, 5]
    assert parse_folds(None, "synthetic") is None
    with pytest.raises(ConfigError, match="outside 1..10"):
        parse_folds("2,11", f"iemocap:{tmp_path / 'iemocap'}")
    with pytest.raises(ConfigError, match="no cross-validation folds"):
        parse_folds("all", "synthetic")
    with pytest.raises(ConfigError, match="twice"):
        parse_folds("1,1", f"iemocap:{tmp_path / 'iemocap'}")
    assert parse_seeds("3", base_seed=5) == [5, 6, 7]
    assert parse_seeds("0,4,7") == [0, 4, 7] and parse_seeds("2-4") == [2, 3, 4]
    with pytest.raises(ConfigError, match="seeds"):
        parse_seeds("x")
    with pytest.raises(ConfigError, match="at least 1"):
        parse_seeds("0")
    with pytest.raises(ConfigError, match="seeds"):
        load_config(None, seeds="1,b")
    cfg = load_config(None, data=f"iemocap:{tmp_path / 'iemocap'}", folds="1-2", seeds="2")
    assert cv_runs(cfg) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert [run_label(f, s) for f, s in cv_runs(cfg)] == ["fold-01-seed-0", "fold-01-seed-1", "fold-02-seed-0",
                                                           "fold-02-seed-1"]
    assert cv_runs(load_config(None)) == []


def test_aggregate_is_the_mean_and_sample_std():
    runs = [{"{a}": {"UA": 0.5, "WA": 0.4}, "per_class_F1": [0.1, 0.3]},
            {"{a}": {"UA": 0.7, "WA": 0.6}, "per_class_F1": [0.3, 0.5]},
            {"{a}": {"UA": 0.9, "WA": 0.5}, "per_class_F1": [0.5, 0.7]}]
    mean, std = aggregate_metrics(runs)
    assert mean["{a}"]["UA"] == pytest.approx(0.7) and std["{a}"]["UA"] == pytest.approx(0.2)  # ddof = 1
    assert mean["{a}"]["WA"] == pytest.approx(0.5) and std["{a}"]["WA"] == pytest.approx(0.1)
    assert mean["per_class_F1"] == pytest.approx([0.3, 0.5]) and std["per_class_F1"] == pytest.approx([0.2, 0.2])
    mean, std = aggregate_metrics(runs[:1])
    assert mean["{a}"]["UA"] == 0.5 and math.isnan(std["{a}"]["UA"])


def test_cv_over_the_ten_fold_layout(tmp_path, capsys, monkeypatch):
    """--folds all on a 10-fold IEMOCAP layout: ten runs, per-fold rows, the mean ± std table, figures."""
    _write_layout(tmp_path / "data", folds=range(1, 11))
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--model", "baseline", "--data", f"iemocap:{tmp_path / 'data' / 'config.json'}",
            "--folds", "all", "--epochs", "1", "--batch-size", "2", "--out", "cv", "--device", "cpu",
            "--no-progress", "--no-tensorboard"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "±" in out and "{a,v,l}" in out
    cv = tmp_path / "cv"
    assert sorted(p.name for p in cv.glob("fold-*")) == [f"fold-{f:02d}" for f in range(1, 11)]
    saved = json.loads((cv / "cv_results.json").read_text())
    assert saved["n_runs"] == 10 and [r["fold"] for r in saved["runs"]] == list(range(1, 11))
    per_fold = [json.loads((cv / f"fold-{f:02d}" / "test_metrics.json").read_text())["metrics"]
                for f in range(1, 11)]
    assert [r["metrics"] for r in saved["runs"]] == per_fold
    for cond in ("{a}", "average", "{a,v,l}"):
        values = [m[cond]["UA"] for m in per_fold]
        assert saved["mean"][cond]["UA"] == pytest.approx(np.mean(values))
        assert saved["std"][cond]["UA"] == pytest.approx(np.std(values, ddof=1))
    # The summed confusion matrices count every test utterance of every fold once per condition.
    assert sum(map(sum, saved["confusion_summed"]["{a,v,l}"])) == 10 * 2
    rows = _rows(cv / "cv_results.csv")
    assert [r["model"] for r in rows] == [f"fold {f}" for f in range(1, 11)] + ["mean", "std"]
    assert float(rows[-2]["average UA"]) == pytest.approx(100 * saved["mean"]["average"]["UA"], abs=0.006)
    md = (cv / "cv_results.md").read_text()
    assert "±" in md and "fold 10" in md
    for name in ("cv_spread.png", "cv_confusion_matrices.png"):
        assert (cv / name).read_bytes()[:4] == b"\x89PNG"


def test_seeds_on_synthetic_data(tmp_path, capsys, monkeypatch):
    """--seeds 3 without folds: three rows and their aggregate; a second call reuses the three runs."""
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--model", "baseline", "--data", "synthetic", "--seeds", "3", "--seed", "4", "--epochs", "1",
            "--batch-size", "32", "--out", "s", "--device", "cpu", "--no-progress", "--no-tensorboard", *DATA_FLAGS]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    rows = _rows(tmp_path / "s" / "cv_results.csv")
    assert [r["model"] for r in rows] == ["seed 4", "seed 5", "seed 6", "mean", "std"]
    ua = [float(r["{a,v,l} UA"]) for r in rows[:3]]
    assert len(set(ua)) > 1, "three seeds gave the same model: the seed does not reach the run"
    assert float(rows[3]["{a,v,l} UA"]) == pytest.approx(np.mean(ua), abs=0.01)
    assert float(rows[4]["{a,v,l} UA"]) == pytest.approx(np.std(ua, ddof=1), abs=0.01)
    for seed in (4, 5, 6):
        run = json.loads((tmp_path / "s" / f"seed-{seed}" / "run.json").read_text())
        assert run["config"]["seed"] == seed and run["config"]["seeds"] is None
    assert main(argv) == 0
    assert capsys.readouterr().out.count("finished before, reused") == 3
    # A finished run under other settings is not silently mixed into the mean.
    assert main([*argv, "--lr", "0.01"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_folds_need_a_fold_layout(tmp_path, capsys):
    assert main(["train", "--data", "synthetic", "--folds", "all", "--out", str(tmp_path / "x")]) == 2
    assert "no cross-validation folds" in capsys.readouterr().err


def _cv_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "mmer_ext", "train", "--model", "mmin", "--data", "synthetic", "--seeds", "2",
            "--out", str(out), "--epochs", "3", "--batch-size", "32", "--no-progress", "--device", "cpu",
            "--no-tensorboard", *DATA_FLAGS]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_a_killed_cv_resumes_at_the_run_and_epoch_it_stopped(tmp_path):
    """SIGKILL during the second seed's student; the rerun reuses the first seed, resumes the second mid-stage and
    ends with the same table as an uninterrupted cross-validation."""
    reference = tmp_path / "reference"
    subprocess.run(_cv_cmd(reference), check=True, cwd=tmp_path, env=_env(), capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cv_cmd(killed), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = killed / "seed-1" / "student" / "latest.json"
    deadline = time.monotonic() + 600
    while not marker.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the CV finished before it could be killed; the test proves nothing"
    assert (killed / "seed-0" / "test_metrics.json").is_file()
    assert not (killed / "seed-1" / "test_metrics.json").exists() and not (killed / "cv_results.csv").exists()

    resumed = subprocess.run(_cv_cmd(killed), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    text = resumed.stdout + resumed.stderr
    assert "seed-0: finished before, reused" in text
    assert "resuming after epoch" in text  # the interrupted run went on from its last epoch, not from scratch
    assert _rows(killed / "cv_results.csv") == _rows(reference / "cv_results.csv")
