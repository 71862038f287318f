"""End to end: every recipe trains and evaluates; checkpoints reload to the same predictions; a killed run resumes
to the same weights; two DDP processes on gloo match one process."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_data import TINY
from mmer_ext.data import CONDITION_LABELS
from mmer_ext.train import evaluate_model, fit, load_config, load_model, resolve_stages

MODELS = ("baseline", "augmented", "mmin", "ifmmin", "nmer")
QUIET = lambda msg: None  # noqa: E731


def _cfg(tmp_path, model, **kw):
    return load_config(None, model=model, out_dir=str(tmp_path), epochs=kw.pop("epochs", 1), batch_size=32,
                       progress=False, data_options=TINY, **kw)


@pytest.mark.parametrize("model", MODELS)
def test_fit_writes_a_reloadable_model(model, tiny_splits, tmp_path):
    cfg = _cfg(tmp_path, model)
    result = fit(cfg, splits=tiny_splits, log=QUIET)
    stages = resolve_stages(cfg)
    for stage in stages:
        done = json.loads((tmp_path / stage.name / "done.json").read_text())
        assert done["best_epoch"] == 1
    per_class = result.test_metrics.pop("per_class_F1")
    confusion = result.test_metrics.pop("confusion")
    n_test, k = len(tiny_splits["test"]), tiny_splits["test"].num_classes
    assert set(confusion) == set(CONDITION_LABELS) | {"overall"}
    for cond, counts in confusion.items():
        assert len(counts) == k and all(len(row) == k for row in counts)
        assert sum(map(sum, counts)) == (7 * n_test if cond == "overall" else n_test)
        # Row sums are the true class counts, whatever the model predicts.
        assert [sum(row) for row in counts] == (torch.bincount(tiny_splits["test"].labels, minlength=k) *
                                                (7 if cond == "overall" else 1)).tolist()
    # The diagonal over the row sums is the per-class recall: its mean is the UA of the condition.
    for cond in CONDITION_LABELS:
        counts = torch.tensor(confusion[cond], dtype=torch.float64)
        recall = counts.diag() / counts.sum(1).clamp_min(1)
        assert abs(float(recall.mean()) - result.test_metrics[cond]["UA"]) < 1e-9
    assert (tmp_path / "confusion_matrices.png").is_file()
    assert len(per_class) == tiny_splits["test"].num_classes and all(0.0 <= v <= 1.0 for v in per_class)
    assert set(result.test_metrics) == set(CONDITION_LABELS) | {"average", "overall"}
    for values in result.test_metrics.values():
        assert set(values) == {"WA", "UA", "F1", "WF1"} and all(0.0 <= v <= 1.0 for v in values.values())
    saved = json.loads((tmp_path / "test_metrics.json").read_text())
    assert saved["metrics"] == {**result.test_metrics, "per_class_F1": per_class, "confusion": confusion}

    reloaded, meta = load_model(tmp_path / "model.safetensors")
    assert type(reloaded) is type(result.model)
    assert meta["recipe"] == model and meta["stages"] == [s.name for s in stages]
    again = evaluate_model(reloaded, tiny_splits["test"], num_classes=meta["num_classes"],
                           corruption=meta["corruption"], noise_steps=meta["noise_steps"], seed=cfg.seed)
    assert again == result.test_metrics


def test_student_starts_from_the_trained_teacher(tiny_splits, tmp_path):
    result = fit(_cfg(tmp_path, "mmin"), splits=tiny_splits, log=QUIET)
    teacher = load_file(str(tmp_path / "teacher" / "best.safetensors"))
    student = result.model.state_dict()
    # The frozen teacher inside the student is the selected teacher epoch, untouched by the student's training.
    for key, value in teacher.items():
        assert torch.equal(student[f"teacher.{key}"], value), key


def test_teacher_checkpoint_skips_the_first_stage(tiny_splits, tmp_path):
    base = fit(_cfg(tmp_path / "baseline", "baseline"), splits=tiny_splits, log=QUIET)
    logs = []
    fit(_cfg(tmp_path / "mmin", "mmin"), splits=tiny_splits, log=logs.append,
        teacher_checkpoint=tmp_path / "baseline" / "model.safetensors")
    assert not (tmp_path / "mmin" / "teacher").exists()
    assert any("loaded from" in line for line in logs)
    student = load_file(str(tmp_path / "mmin" / "model.safetensors"))
    for key, value in base.model.state_dict().items():
        assert torch.equal(student[f"teacher.{key}"], value), key
    with pytest.raises(Exception, match="needs a UttShared"):
        fit(_cfg(tmp_path / "ifmmin", "ifmmin"), splits=tiny_splits, log=QUIET,
            teacher_checkpoint=tmp_path / "baseline" / "model.safetensors")


def test_finished_stages_are_not_retrained(tiny_splits, tmp_path):
    fit(_cfg(tmp_path, "baseline"), splits=tiny_splits, log=QUIET)
    logs = []
    fit(_cfg(tmp_path, "baseline"), splits=tiny_splits, log=logs.append)
    assert any("already trained" in line for line in logs)


def _train_cmd(out: Path, model: str, epochs: int, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "mmer_ext", "train", "--model", model, "--data", "synthetic", "--out", str(out),
           "--epochs", str(epochs), "--batch-size", "32", "--no-progress", "--device", "cpu"]
    for key, value in TINY.items():
        cmd += ["--set", f"data_options.{key}={value}"]
    return cmd + list(extra)


def _env():
    # One thread per process: the runs being compared must also be deterministic in their reductions.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_a_killed_run_resumes_to_the_same_result(tmp_path):
    """SIGKILL in the student's second epoch; the rerun of the same command ends bit-identical to an uninterrupted run."""
    model, epochs = "mmin", 4
    reference = tmp_path / "reference"
    subprocess.run(_train_cmd(reference, model, epochs), check=True, cwd=tmp_path, env=_env(), capture_output=True,
                   timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, model, epochs), cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "student" / "latest.json"
    deadline = time.monotonic() + 600
    while not marker.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; the test proves nothing"
    assert not (killed / "model.safetensors").exists()
    assert json.loads(marker.read_text())["epoch"] < epochs

    resumed = subprocess.run(_train_cmd(killed, model, epochs), cwd=tmp_path, env=_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "already trained" in resumed.stdout + resumed.stderr  # the teacher stage was not redone
    assert "resuming after epoch" in resumed.stdout + resumed.stderr
    ref, got = _weights(reference / "model.safetensors"), _weights(killed / "model.safetensors")
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    ref_metrics = json.loads((reference / "test_metrics.json").read_text())["metrics"]
    assert json.loads((killed / "test_metrics.json").read_text())["metrics"] == ref_metrics
    # Superseded epoch files are cleaned up; only the newest weights and the best remain, and the finished stage's
    # optimizer state is gone.
    assert len(list((killed / "student").glob("epoch-*.safetensors"))) == 1
    assert not list(killed.glob("*/*.state.pt"))
    # The per-epoch log has one row per epoch, the same rows as the uninterrupted run (timings apart).
    def rows(run: Path) -> list[dict[str, str]]:
        with (run / "metrics.csv").open(newline="") as fh:
            return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]

    assert len(rows(reference)) == 2 * epochs
    assert rows(killed) == rows(reference)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this torch has no gloo backend")
def test_two_ddp_processes_match_one(tmp_path):
    """torchrun with 2 CPU processes on gloo: each rank takes half of every global batch (DistributedSampler), DDP
    averages the gradients, so without dropout the weights match one process up to float reduction order."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip(f"no torchrun next to {sys.executable}")
    no_dropout = ["--set", "hparams.main.dropout=0.0", "--set", "hparams.main.text_dropout=0.0"]
    single = tmp_path / "single"
    subprocess.run(_train_cmd(single, "baseline", 2, *no_dropout), check=True, cwd=tmp_path, env=_env(),
                   capture_output=True, timeout=600)
    ddp = tmp_path / "ddp"
    cmd = _train_cmd(ddp, "baseline", 2, *no_dropout)
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", *cmd[1:]], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((ddp / "run.json").read_text())["world_size"] == 2
    a, b = _weights(single / "model.safetensors"), _weights(ddp / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    ma = json.loads((single / "test_metrics.json").read_text())["metrics"]
    mb = json.loads((ddp / "test_metrics.json").read_text())["metrics"]
    for fa, fb in zip(ma.pop("per_class_F1"), mb.pop("per_class_F1")):
        assert abs(fa - fb) <= 0.05
    ma.pop("confusion"), mb.pop("confusion")
    for cond in ma:
        for metric in ma[cond]:
            assert abs(ma[cond][metric] - mb[cond][metric]) <= 0.05, (cond, metric)


def test_resume_refuses_a_changed_config(tiny_splits, tmp_path):
    from mmer_ext.train import ConfigError

    fit(_cfg(tmp_path, "baseline"), splits=tiny_splits, log=QUIET)
    with pytest.raises(ConfigError, match="lr"):
        fit(_cfg(tmp_path, "baseline", lr=1e-3), splits=tiny_splits, log=QUIET)
    # --no-resume retrains the stage from scratch under the new settings, and later runs resume that one.
    logs = []
    fit(_cfg(tmp_path, "baseline", lr=1e-3, resume=False), splits=tiny_splits, log=logs.append)
    assert not any("already trained" in line for line in logs)
    logs = []
    fit(_cfg(tmp_path, "baseline", lr=1e-3), splits=tiny_splits, log=logs.append)
    assert any("already trained" in line for line in logs)
