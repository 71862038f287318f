"""Checkpoints are checked before use (metadata, names, shapes, dtypes, finiteness, SHA-256) and run directories stay
the user's: a refused train writes nothing, pointer files never lead outside, one training at a time holds a run."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from tiny_data import TINY
from mmer_ext.cli import main
from mmer_ext.train.checkpoint import DIGEST_KEY, METADATA_KEY, UnverifiedCheckpointWarning, tensor_digest

DATA_FLAGS = [arg for k, v in TINY.items() for arg in ("--set", f"data_options.{k}={v}")]
TRAIN = ["train", "--model", "baseline", "--epochs", "1", "--batch-size", "32", "--no-progress", "--device", "cpu",
         *DATA_FLAGS]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny baseline run (a few seconds), copied by each test that changes it."""
    root = tmp_path_factory.mktemp("trained")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        # A finished stage drops its optimizer states; keep them, so that deleting done.json makes an unfinished
        # stage whose latest.json resume follows.
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("mmer_ext.train.stage_dir.drop_states", lambda stage_dir: None)
            assert main([*TRAIN, "--out", "run"]) == 0
    finally:
        os.chdir(cwd)
    return root / "run"


@pytest.fixture
def run(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _rewrite(path, state, metadata, *, rehash=True):
    metadata = dict(metadata)
    if rehash:
        metadata[DIGEST_KEY] = tensor_digest(state)
    path.write_bytes(st_save(state, metadata=metadata))


def _evaluate(capsys, *extra) -> tuple[int, str]:
    code = main(["evaluate", "run/model.safetensors", "--device", "cpu", *extra])
    return code, capsys.readouterr().err


def _edit_meta(run, edit):
    state, meta = _read(run / "model.safetensors")
    info = json.loads(meta[METADATA_KEY])
    meta[METADATA_KEY] = edit(info) if callable(edit) else edit
    if not isinstance(meta[METADATA_KEY], str):
        meta[METADATA_KEY] = json.dumps(meta[METADATA_KEY])
    _rewrite(run / "model.safetensors", state, meta)


def _without(key):
    def edit(info):
        del info[key]
        return info
    return edit


def _with(key, value):
    def edit(info):
        info[key] = value
        return info
    return edit


def _with_config(key, value):
    def edit(info):
        info["config"][key] = value
        return info
    return edit


@pytest.mark.parametrize("edit, message", [
    ("{not json", "metadata is not valid JSON"),
    ("[1, 2]", "metadata must be a JSON object, got list"),
    (_without("recipe"), "metadata lacks recipe"),
    (_without("dims"), "metadata lacks dims"),
    (_without("config"), "metadata lacks config"),
    (_without("hparams"), "metadata lacks hparams"),
    (_with("format", 99), "has format 99"),
    (_with("recipe", "resnet"), "unknown recipe 'resnet'"),
    (_with("dims", [130, 342]), "dims must be three positive integers"),
    (_with("dims", [130, 342, -1]), "dims must be three positive integers"),
    (_with("dims", [131, 342, 1024]), "tensor 'encoders.A"),
    (_with("num_classes", 0), "num_classes must be a positive integer, got 0"),
    (_with("num_classes", "4"), "num_classes must be a positive integer, got '4'"),
    (_with("num_classes", 5), "class_names must list num_classes=5 names"),
    (_with("hparams", {"dropout": 0.1}), "hparams must be a list"),
    (_with("hparams", [{"dropout": 7}]), "does not build a baseline model"),
    (_with("hparams", [{"no_such_argument": 1}]), "does not build a baseline model"),
    (_with("stages", ["teacher"]), "stages ['teacher'] are not the stages ['main']"),
    (_with("corruption", "blur"), "corruption 'blur' is not one of"),
    (_with("noise_steps", 0), "noise_steps must be a positive integer"),
    (_with("config", "x"), "config must be an object"),
    (_with_config("seed", -3), "its training config is not valid: seed must be >= 0"),
    (_with_config("model", "mmin"), "metadata says recipe 'baseline' but its config says model 'mmin'"),
])
def test_edited_metadata_is_named(run, capsys, edit, message):
    _edit_meta(run, edit)
    code, err = _evaluate(capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert err.startswith("mmer-ext evaluate: error: checkpoint 'run/model.safetensors'"), err


def test_metadata_of_another_model_is_refused(run, capsys):
    """A baseline's weights with metadata saying mmin: the names do not fit, so it is not evaluated as mmin."""
    def as_mmin(info):
        info["recipe"], info["config"]["model"] = "mmin", "mmin"
        info["stages"], info["hparams"] = ["teacher", "student"], [{}, {}]
        return info

    _edit_meta(run, as_mmin)
    code, err = _evaluate(capsys)
    assert code == 2 and "does not fit MMIN (is its recipe right?)" in err, err


@pytest.mark.parametrize("change, message", [
    (lambda t: t.fill_(float("nan")), "holds NaN or infinite values"),
    (lambda t: t.to(torch.int64), "has dtype torch.int64, UttFusion needs torch.float32"),
    (lambda t: t.double(), "has dtype torch.float64"),
    (lambda t: t[:1].clone(), "has shape"),
])
def test_weights_are_checked_against_the_model(run, capsys, change, message):
    state, meta = _read(run / "model.safetensors")
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 2)
    state[name] = change(state[name].clone())
    _rewrite(run / "model.safetensors", state, meta)
    code, err = _evaluate(capsys)
    assert code == 2 and f"tensor {name!r}" in err and message in err, err


def test_a_flipped_byte_is_named_and_no_verify_skips_the_check(run, capsys):
    path = run / "model.safetensors"
    before = _evaluate(capsys, "--json")
    assert before[0] == 0
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # the low bit of a float32's mantissa: a plausible, finite, wrong weight
    path.write_bytes(bytes(data))
    code, err = _evaluate(capsys)
    assert code == 2 and "checkpoint 'run/model.safetensors' is corrupted" in err and "--no-verify" in err, err
    code, err = _evaluate(capsys, "--no-verify")
    assert code == 0, err


def test_old_checkpoint_without_checksum_loads_with_a_warning(run, capsys):
    from mmer_ext.train import load_model

    state, meta = _read(run / "model.safetensors")
    del meta[DIGEST_KEY]
    _rewrite(run / "model.safetensors", state, meta, rehash=False)
    with pytest.warns(UnverifiedCheckpointWarning, match="has no checksum"):
        load_model(run / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(run / "model.safetensors", verify=False)  # --no-verify: nothing to warn about
    with pytest.warns(UnverifiedCheckpointWarning):
        assert main(["evaluate", "run/model.safetensors", "--device", "cpu"]) == 0


def test_explicit_fold_and_noise_steps_are_used(run, capsys):
    code, err = _evaluate(capsys, "--fold", "0")
    assert code == 2 and "fold must be at least 1, got 0" in err
    code, err = _evaluate(capsys, "--noise-steps", "0", "--corruption", "gaussian")
    assert code == 2 and "noise_steps must be at least 1, got 0" in err
    code, err = _evaluate(capsys, "--split", "val")
    assert code == 0, err


# ------------------------------------------------------------------------------------------------ run directories
def test_a_refused_train_leaves_the_run_directory_as_it_was(run, capsys):
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main([*TRAIN, "--out", "run", "--seed", "1"]) == 2
    assert "holds a stage trained with other settings (seed)" in capsys.readouterr().err
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # run.json still says seed 0; nothing written, not even a lock file


@pytest.mark.parametrize("pointer", [
    "../../victim/x.safetensors", "/etc/passwd", "sub/epoch-001.safetensors", "", 7, None,
])
def test_resume_refuses_pointers_out_of_the_run_directory(run, capsys, pointer):
    victim = run.parent / "victim"
    victim.mkdir()
    (victim / "x.safetensors").write_bytes(b"victim's file")
    (run / "main" / "done.json").unlink()  # an unfinished stage: resume reads latest.json
    (run / "main" / "latest.json").write_text(json.dumps({"weights": pointer, "state": "epoch-001.state.pt",
                                                          "epoch": 1}))
    before = (run / "run.json").read_bytes()
    assert main([*TRAIN, "--out", "run"]) == 2
    err = capsys.readouterr().err
    assert "latest.json key 'weights'" in err and "--no-resume" in err and "Traceback" not in err, err
    assert (victim / "x.safetensors").read_bytes() == b"victim's file"
    assert (run / "run.json").read_bytes() == before  # refused before anything was written


def test_resume_refuses_a_symlink_that_leads_outside(run, capsys):
    victim = run.parent / "victim.safetensors"
    shutil.copy(run / "main" / "epoch-001.safetensors", victim)
    (run / "main" / "done.json").unlink()
    (run / "main" / "link.safetensors").symlink_to(victim)
    (run / "main" / "latest.json").write_text(json.dumps({"weights": "link.safetensors",
                                                          "state": "epoch-001.state.pt", "epoch": 1}))
    assert main([*TRAIN, "--out", "run"]) == 2
    assert "outside the run directory" in capsys.readouterr().err
    assert victim.is_file()


def test_a_broken_pointer_file_is_named(run, capsys):
    (run / "main" / "done.json").unlink()
    (run / "main" / "latest.json").write_text("{half")
    assert main([*TRAIN, "--out", "run"]) == 2
    assert "latest.json' is not valid JSON" in capsys.readouterr().err
    (run / "main" / "latest.json").write_text('{"weights": "epoch-001.safetensors", "state": "epoch-001.state.pt"}')
    assert main([*TRAIN, "--out", "run"]) == 2
    assert "must hold a JSON object with weights, state and epoch" in capsys.readouterr().err
    (run / "main" / "done.json").write_text("[")
    assert main([*TRAIN, "--out", "run"]) == 2
    assert "done.json' is not valid JSON" in capsys.readouterr().err


def test_resume_still_works_inside_the_run_directory(run, capsys):
    (run / "main" / "done.json").unlink()
    assert main([*TRAIN, "--out", "run", "--set", "stage_epochs.main=2"]) == 2  # other settings: refused ...
    capsys.readouterr()
    assert main([*TRAIN, "--out", "run"]) == 0  # ... the same ones resume after epoch 1 and finish
    assert "[main] resuming after epoch 1 from run/main" in capsys.readouterr().out
    assert (run / "main" / "done.json").is_file()


def test_a_second_training_on_the_same_out_says_who_holds_it(run, capsys):
    import socket

    from mmer_ext.train.rundir import run_lock

    with run_lock("run"):
        assert main([*TRAIN, "--out", "run", "--no-resume"]) == 2
        err = capsys.readouterr().err
        assert f"'run' is in use by another training (pid {os.getpid()} on {socket.gethostname()}, started " in err
        assert "wait for it to finish or train into another --out" in err
    # Released on exit, and a lock file left by a dead holder does not block: flock dies with its process.
    (run / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone", "started": "long ago"}))
    assert main([*TRAIN, "--out", "run", "--no-resume"]) == 0


def test_the_lock_holds_across_processes(run, capsys):
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mmer_ext.train.rundir import run_lock\n"
                               "with run_lock('run'):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  p for p in sys.path if p)})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main([*TRAIN, "--out", "run", "--no-resume"]) == 2
        assert f"(pid {holder.pid} on " in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert main([*TRAIN, "--out", "run"]) == 0  # killed holder: the lock went with it


def test_evaluate_names_flags_the_model_cannot_use_and_a_directory(run, capsys):
    code, err = _evaluate(capsys, "--missing-rates", "0.3")
    assert code == 2 and "--missing-rates does not apply to baseline (it is not an IMDer model)" in err, err
    assert main(["evaluate", "run"]) == 2
    assert "checkpoint 'run' is a directory; give the model.safetensors in it" in capsys.readouterr().err
