"""Runs one can track: the plan, checkpoint retention, metrics.csv / TensorBoard / curves across a resume, run.json,
and the files `mmer-ext evaluate` writes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tiny_data import TINY
from mmer_ext.train import ConfigError, fit, load_config, resolve_stages

PNG = b"\x89PNG\r\n\x1a\n"


def _cfg(tmp_path, model="baseline", **kw):
    return load_config(None, model=model, out_dir=str(tmp_path), epochs=kw.pop("epochs", 2), batch_size=32,
                       progress=False, data_options=TINY, **kw)


def _rows(path: Path, drop=("seconds",)) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(fh)]


# ------------------------------------------------------------------------------------------------------------ plan


def test_plan_counts_sizes_and_steps(tiny_splits, tmp_path):
    from mmer_ext.train.plan import format_plan, make_plan, steps_per_epoch

    assert steps_per_epoch(96, 32) == 3 and steps_per_epoch(97, 32) == 4
    assert steps_per_epoch(97, 32, world_size=2) == 4  # 49 per rank, 16 per rank and step
    cfg = _cfg(tmp_path, "mmin", epochs=3)
    plan = make_plan(cfg, resolve_stages(cfg), tiny_splits)
    assert plan["sizes"] == {"train": 96, "val": 24, "test": 24}
    assert [(s["name"], s["epochs"], s["steps_per_epoch"], s["steps"]) for s in plan["stages"]] == [
        ("teacher", 3, 3, 9), ("student", 3, 3, 9)]
    assert plan["steps"] == 18 and plan["epochs"] == 6
    text = "\n".join(format_plan(plan))
    assert "96 train / 24 val / 24 test utterances" in text and "18 optimizer steps" in text
    assert "note:" not in text  # epochs were chosen: no warning about the recipe's length

    recipe = load_config(None, model="mmin", out_dir=str(tmp_path), data_options=TINY)
    text = "\n".join(format_plan(make_plan(recipe, resolve_stages(recipe), tiny_splits)))
    # 96 utterances at the recipe's batch 128: 1 step per epoch, 20 + 60 epochs: short, so no note either
    assert "80 epochs, 80 optimizer steps" in text and "note:" not in text


def test_the_default_run_warns_of_its_length(tmp_path):
    from mmer_ext.data import make_synthetic_utterances
    from mmer_ext.train.plan import format_plan, make_plan

    cfg = load_config(None, out_dir=str(tmp_path))
    assert cfg.epochs is None and cfg.data == "synthetic"
    # The default data at its real size (3000 / 600 / 1200), generated small: only the lengths matter to the plan.
    splits = make_synthetic_utterances(seed=0, preset="small", n_train=3000, n_val=600, n_test=1200)
    lines = format_plan(make_plan(cfg, resolve_stages(cfg), splits))
    assert lines[0].startswith("plan: mmin on synthetic")
    assert any("teacher" in line and "20 epochs" in line and "24 steps/epoch" in line for line in lines)
    assert any("student" in line and "60 epochs" in line for line in lines)
    assert any(line.strip().startswith("note: the recipe's full length (1920 steps)") for line in lines)


def test_fit_prints_the_plan_first(tiny_splits, tmp_path):
    logs: list[str] = []
    fit(_cfg(tmp_path, epochs=1), splits=tiny_splits, log=logs.append)
    assert logs[0].startswith("plan: baseline on synthetic")
    first_epoch = next(i for i, line in enumerate(logs) if "epoch 1/1" in line)
    assert any("stage main" in line for line in logs[:first_epoch])


# ------------------------------------------------------------------------------------------------------ retention


@pytest.mark.parametrize("keep, kept", [(1, [3]), (2, [2, 3]), (-1, [1, 2, 3])])
def test_checkpoints_kept(keep, kept, tiny_splits, tmp_path):
    result = fit(_cfg(tmp_path, epochs=3, keep_checkpoints=keep), splits=tiny_splits, log=lambda m: None)
    stage = tmp_path / "main"
    assert sorted(p.name for p in stage.glob("epoch-*")) == [f"epoch-{e:03d}.safetensors" for e in kept]
    assert not list(stage.glob("*.state.pt"))  # the stage finished: its optimizer state is gone
    best_epoch = result.stages[0].best_epoch
    # The final model and the last stage's best weights are one file on disk, with the best epoch's file if kept.
    assert os.path.samefile(tmp_path / "model.safetensors", stage / "best.safetensors")
    best_file = stage / f"epoch-{best_epoch:03d}.safetensors"
    assert not best_file.exists() or os.path.samefile(best_file, stage / "best.safetensors")
    from mmer_ext.train import read_weights_metadata

    assert read_weights_metadata(stage / "best.safetensors")["epoch"] == best_epoch


def test_prune_epochs_keeps_newest_and_current_state(tmp_path):
    from mmer_ext.train.retention import drop_states, prune_epochs

    for e in range(1, 7):
        (tmp_path / f"epoch-{e:03d}.safetensors").write_bytes(b"w")
        (tmp_path / f"epoch-{e:03d}.state.pt").write_bytes(b"s")
    (tmp_path / "best.safetensors").write_bytes(b"b")
    (tmp_path / "notes-epoch-001.safetensors").write_bytes(b"x")  # not ours: never touched
    prune_epochs(tmp_path, keep=2, current_epoch=4)  # 5 and 6 are left over from a longer earlier run
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.safetensors", "epoch-003.safetensors", "epoch-004.safetensors", "epoch-004.state.pt",
        "notes-epoch-001.safetensors"]
    drop_states(tmp_path)
    assert not list(tmp_path.glob("*.state.pt"))


@pytest.mark.parametrize("value", [0, -2])
def test_keep_checkpoints_is_validated(value):
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        load_config(None, [f"keep_checkpoints={value}"])


def test_link_or_copy_links_atomically(tmp_path):
    from mmer_ext.train.retention import link_or_copy

    src, dst = tmp_path / "epoch-001.safetensors", tmp_path / "best.safetensors"
    src.write_bytes(b"weights")
    dst.write_bytes(b"old")
    link_or_copy(src, dst)
    assert os.path.samefile(src, dst)
    link_or_copy(src, dst)  # already the same file: nothing changes, nothing is left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "epoch-001.safetensors"]


def test_link_or_copy_falls_back_to_a_copy(tmp_path, monkeypatch):
    from mmer_ext.train import retention

    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"weights")
    dst.write_bytes(b"old")

    def no_links(*args, **kwargs):
        raise OSError("no hard links here")

    monkeypatch.setattr(retention.os, "link", no_links)
    retention.link_or_copy(src, dst)
    assert dst.read_bytes() == b"weights" and not os.path.samefile(src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


# ------------------------------------------------------------------------------------ metrics.csv, TensorBoard, curves


def test_metrics_csv_survives_an_interrupted_run(tiny_splits, tmp_path, monkeypatch):
    """Killed right after the student's 2nd checkpoint, before its row is logged: the resumed run's CSV and
    TensorBoard events hold exactly one row per epoch, as an uninterrupted run's do."""
    from mmer_ext.train.tracking import RunTracker

    reference = tmp_path / "reference"
    fit(_cfg(reference, "mmin", epochs=3), splits=tiny_splits, log=lambda m: None)

    original = RunTracker.epoch_end

    def dies_at_student_epoch_2(self, stage, history):
        if stage == "student" and len(history) == 2:
            raise KeyboardInterrupt("killed")
        original(self, stage, history)

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(RunTracker, "epoch_end", dies_at_student_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(interrupted, "mmin", epochs=3), splits=tiny_splits, log=lambda m: None)
    partial = _rows(interrupted / "metrics.csv")
    assert [(r["stage"], r["epoch"]) for r in partial] == [("teacher", "1"), ("teacher", "2"), ("teacher", "3"),
                                                            ("student", "1")]
    monkeypatch.setattr(RunTracker, "epoch_end", original)
    logs: list[str] = []
    fit(_cfg(interrupted, "mmin", epochs=3), splits=tiny_splits, log=logs.append)
    assert any("resuming after epoch 2" in line for line in logs)

    expected = _rows(reference / "metrics.csv")
    assert [(r["stage"], r["epoch"]) for r in expected] == [(s, str(e)) for s in ("teacher", "student")
                                                             for e in (1, 2, 3)]
    assert _rows(interrupted / "metrics.csv") == expected
    assert {"lr", "train/loss", "val/UA", "train/cycle"} <= set(expected[0]) | set(expected[-1])
    assert (interrupted / "training_curves.png").read_bytes()[:8] == PNG

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(interrupted / "tensorboard" / "student"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == [1, 2, 3]
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([float(r["train/loss"]) for r in expected[3:]], rel=1e-6)


def test_no_tensorboard_no_events(tiny_splits, tmp_path, monkeypatch):
    import sys

    from mmer_ext.train import tracking

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    assert not tracking.tensorboard_available()
    fit(_cfg(tmp_path, epochs=1), splits=tiny_splits, log=lambda m: None)
    assert not (tmp_path / "tensorboard").exists()
    assert len(_rows(tmp_path / "metrics.csv")) == 1


def test_tensorboard_can_be_turned_off(tiny_splits, tmp_path):
    fit(_cfg(tmp_path, epochs=1, tensorboard=False), splits=tiny_splits, log=lambda m: None)
    assert not (tmp_path / "tensorboard").exists()
    assert (tmp_path / "training_curves.png").read_bytes()[:8] == PNG


# --------------------------------------------------------------------------------------------------------- run.json


def test_run_json_records_the_environment(tiny_splits, tmp_path):
    import platform

    from mmer_ext import build_info

    fit(_cfg(tmp_path, epochs=1), splits=tiny_splits, log=lambda m: None)
    run = json.loads((tmp_path / "run.json").read_text())
    env = run["environment"]
    info = build_info()
    assert env["mmer_ext"] == info["mmer_ext"] and env["torch"] == torch.__version__
    assert env["cuda"] == torch.version.cuda and env["cuda_arch_list"] == info["cuda_arch_list"]
    assert env["python"] == platform.python_version() and env["device"] == "cpu"
    assert "pytest" in env["command"]
    assert run["plan"]["steps"] == 3
    package = Path(__import__("mmer_ext").__file__).resolve().parent
    try:
        top = subprocess.run(["git", "-C", str(package), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        top = None
    if top is not None and Path(top).resolve() / "mmer_ext" == package:
        head = subprocess.run(["git", "-C", top, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert env["git"]["commit"] == head
    else:
        assert env["git"] is None


def test_git_commit_tolerates_no_repository_and_no_git(tmp_path, monkeypatch):
    from mmer_ext.train.tracking import git_commit

    package = tmp_path / "mmer_ext"
    package.mkdir()
    assert git_commit(package) is None  # not a checkout
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert git_commit() is None  # no git at all


# --------------------------------------------------------------------------------------------------------- evaluate


def test_evaluate_writes_tables_and_chart(tiny_splits, tmp_path, capsys, monkeypatch):
    from mmer_ext.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", "baseline", "--epochs", "1", "--batch-size", "32", "--no-progress", "--out",
                 "run", "--device", "cpu", *[a for k, v in TINY.items() for a in ("--set", f"data_options.{k}={v}")]]
                ) == 0
    capsys.readouterr()
    assert main(["evaluate", "run/model.safetensors", "--device", "cpu", "--json"]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out)
    assert "eval-test-zero.json" in captured.err
    saved = json.loads((tmp_path / "run" / "eval-test-zero.json").read_text())
    assert saved["metrics"] == metrics and saved["settings"]["corruption"] == "zero"
    assert saved["meta"]["environment"]["torch"] == torch.__version__
    rows = list(csv.reader((tmp_path / "run" / "eval-test-zero.csv").open()))
    assert rows[0][:3] == ["model", "{a} WA", "{a} UA"] and rows[1][0] == "baseline"
    assert float(rows[1][rows[0].index("{a,v,l} UA")]) == pytest.approx(100 * metrics["{a,v,l}"]["UA"], abs=0.01)
    md = (tmp_path / "run" / "eval-test-zero.md").read_text()
    assert "| Model | {a} WA" in md and "| baseline |" in md
    assert (tmp_path / "run" / "eval-test-zero.png").read_bytes()[:8] == PNG

    assert main(["evaluate", "run/model.safetensors", "--device", "cpu", "--corruption", "gaussian",
                 "--noise-steps", "20", "--out", "elsewhere"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == sorted(
        [f"eval-test-gaussian-T20.{ext}" for ext in ("csv", "json", "md", "png")]
        + ["eval-test-gaussian-T20-confusion.png"])
    confusion = json.loads((tmp_path / "elsewhere" / "eval-test-gaussian-T20.json").read_text())["metrics"]["confusion"]
    assert sum(map(sum, confusion["{a,v,l}"])) == len(tiny_splits["test"])


def test_evaluation_files_of_a_missing_rate_sweep(tmp_path):
    from mmer_ext.cli.evaluate import write_evaluation

    metrics = {f"MR={mr:.1f}": {"Acc2_non0": 0.8 - mr / 4, "F1_non0": 0.79 - mr / 4, "Acc7": 0.3, "MAE": 0.9 + mr,
                                "Corr": 0.6, "recovery_MSE": mr} for mr in (0.0, 0.3, 0.7)}
    settings = {"checkpoint": "m.safetensors", "recipe": "imder", "data": "synthetic-mosi", "split": "test",
                "fold": 1, "missing_protocol": "per-sample", "missing_rates": [0.0, 0.3, 0.7]}
    paths = write_evaluation(tmp_path, "eval-test-per-sample", "imder", metrics, settings)
    assert [p.suffix for p in paths] == [".json", ".csv", ".md", ".png"]
    rows = list(csv.reader((tmp_path / "eval-test-per-sample.csv").open()))
    assert rows[0][:3] == ["model", "MR", "Acc2_non0"] and [r[1] for r in rows[1:]] == ["MR=0.0", "MR=0.3", "MR=0.7"]
    assert float(rows[2][2]) == pytest.approx(72.5)
    assert "| imder | MR=0.7 |" in (tmp_path / "eval-test-per-sample.md").read_text()
    assert (tmp_path / "eval-test-per-sample.png").read_bytes()[:8] == PNG
