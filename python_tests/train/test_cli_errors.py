"""Every failure of the command line is one line naming what is wrong and what to do: exit 2 when the input is the
user's to fix, 1 when the run failed at run time; ``--debug`` shows the traceback. A refused command writes nothing."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from tiny_data import TINY
from mmer_ext.cli import main

DATA_FLAGS = [arg for k, v in TINY.items() for arg in ("--set", f"data_options.{k}={v}")]
TRAIN = ["train", "--model", "baseline", "--epochs", "1", "--batch-size", "32", "--no-progress", "--device", "cpu"]


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "warning:" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"mmer-ext {command}: error: "), err
    return lines[0]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_out_that_is_a_file_or_under_one(in_tmp, capsys):
    (in_tmp / "afile").write_text("precious")
    assert main([*TRAIN, *DATA_FLAGS, "--out", "afile"]) == 2
    assert "'afile' is an existing file, not a directory; choose another --out" in _one_line_error(capsys, "train")
    assert main([*TRAIN, *DATA_FLAGS, "--out", "afile/run"]) == 2
    assert "lies under 'afile', which is a file" in _one_line_error(capsys, "train")
    assert (in_tmp / "afile").read_text() == "precious"


def test_out_without_write_permission(in_tmp, capsys, monkeypatch):
    # Tests may run as root, for whom chmod does not bite: the check asks os.access, so ask it to say no.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == "ro" else real_access(p, mode))
    (in_tmp / "ro").mkdir()
    assert main([*TRAIN, *DATA_FLAGS, "--out", "ro/run"]) == 2
    assert "cannot write to 'ro' (permission denied or read-only file system)" in _one_line_error(capsys, "train")
    assert list((in_tmp / "ro").iterdir()) == []


def test_full_disk_is_a_runtime_error(in_tmp, capsys, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)  # every atomic write fsyncs before its rename
    assert main([*TRAIN, *DATA_FLAGS, "--out", "run"]) == 1
    line = _one_line_error(capsys, "train")
    assert "No space left on device -- the disk is full: free some space or write to another --out" in line
    assert not (in_tmp / "run" / "run.json").exists()  # the atomic write left no torn file


def test_malformed_yaml(in_tmp, capsys):
    (in_tmp / "bad.yaml").write_text("model: [baseline\nepochs: 1\n")
    assert main(["train", "--config", "bad.yaml"]) == 2
    assert "config file 'bad.yaml' is not valid YAML" in _one_line_error(capsys, "train")


@pytest.mark.parametrize("device, message", [
    ("cuda:abc", "device 'cuda:abc' must be auto, cpu, cuda or cuda:N"),
    ("bogus", "device 'bogus' must be auto, cpu, cuda or cuda:N"),
    pytest.param("cuda", "this torch sees no CUDA GPU; use --device cpu or auto",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
])
def test_bad_devices(in_tmp, capsys, device, message):
    assert main([*TRAIN, *DATA_FLAGS, "--out", "run", "--device", device]) == 2
    assert message in _one_line_error(capsys, "train")
    assert main(["evaluate", "nope.safetensors", "--device", device]) == 2
    assert message in _one_line_error(capsys, "evaluate")
    assert not (in_tmp / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--set", "num_workers=-1"], "num_workers must be >= 0, got -1"),
    (["--set", "data_options.n_train=0"], "has no (or an empty) 'train' split"),
    (["--set", "hparams.main.dropout=2"], "hparams.main: UttFusion rejects them: dropout probability has to be"),
    (["--seed", str(2**70)], f"seed must be at most {2**63 - 2}, got {2**70}"),
    (["--seed", "-1"], "seed must be >= 0, got -1"),
    (["--noise-steps", "-5"], "noise_steps must be at least 1, got -5"),
    (["--noise-steps", "0"], "noise_steps must be at least 1, got 0"),
    (["--lr", "inf"], "lr must be a finite number, got inf"),
    (["--lr", "nan"], "lr must be a finite number, got nan"),
    (["--set", "eval_missing_rates=[]"], "eval_missing_rates must name at least one missing rate"),
    (["--data", "iemocap:/nonexistent", "--set", "data_options.norm_method=bad"],
     "norm_method must be 'trn' or 'utt', got 'bad'"),
    (["--set", "data_options.nonsense=1"], "do not fit data 'synthetic'"),
])
def test_out_of_range_values(in_tmp, capsys, flags, message):
    data_flags = [] if "--data" in flags else DATA_FLAGS
    assert main([*TRAIN, *data_flags, "--out", "run", *flags]) == 2
    assert message in _one_line_error(capsys, "train")
    assert not (in_tmp / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("model, data, takes, given", [
    ("imder", "synthetic:small", "sentiment sequences (synthetic-mosi", "utterance data"),
    ("mmgcn", "synthetic:small", "dialogue data (synthetic-dialogue", "utterance data"),
    ("baseline", "synthetic-dialogue", "utterance data (synthetic, synthetic:small", "dialogue data"),
    ("baseline", "synthetic-mosi", "utterance data (synthetic", "sentiment sequences"),
    ("nmer", "mmsa-cache:somewhere", "utterance data", "sentiment sequences"),
])
def test_model_and_data_kind_are_checked_first(in_tmp, capsys, model, data, takes, given):
    assert main(["train", "--model", model, "--data", data, "--out", "run", "--device", "cpu"]) == 2
    line = _one_line_error(capsys, "train")
    assert f"model '{model}' trains on {takes}" in line and f"--data '{data}' is {given}" in line
    assert not (in_tmp / "run").exists()


def test_debug_shows_the_traceback(in_tmp, capsys):
    from mmer_ext.train import ConfigError

    for argv in (["--debug", *TRAIN, "--lr", "inf"], [*TRAIN, "--lr", "inf", "--debug"]):
        with pytest.raises(ConfigError, match="lr must be a finite number"):
            main(argv)


def test_an_unexpected_error_is_one_line_with_exit_1(in_tmp, capsys, monkeypatch):
    import mmer_ext.train

    def broken(*args, **kwargs):
        raise RuntimeError("something inside\nbroke")

    monkeypatch.setattr(mmer_ext.train, "fit", broken)
    assert main([*TRAIN, *DATA_FLAGS, "--out", "run"]) == 1
    line = _one_line_error(capsys, "train")
    assert "RuntimeError: something inside broke (unexpected; rerun with --debug for the traceback" in line


def test_interrupt_says_how_to_resume(in_tmp, capsys, monkeypatch):
    import mmer_ext.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mmer_ext.train, "fit", interrupted)
    assert main([*TRAIN, *DATA_FLAGS, "--out", "run"]) == 130
    assert "interrupted; a train run resumes" in _one_line_error(capsys, "train")


class _WritesMarker:
    """Unpickling this runs code (it creates a file): what a malicious pickle holds."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_convert_warns_before_it_unpickles(in_tmp, capsys):
    import pickle
    import subprocess
    import sys
    import warnings

    from mmer_ext.data import UnsafePickleWarning

    marker = in_tmp / "code-ran"
    with open("evil.pkl", "wb") as f:
        pickle.dump({"train": _WritesMarker(marker)}, f)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsafePickleWarning)
        with pytest.raises(UnsafePickleWarning, match="evil.pkl: reading a pickle file executes"):
            main(["--debug", "convert", "evil.pkl", "out"])
    assert not marker.exists()  # the warning comes first: as an error, nothing was unpickled
    # From a shell: the warning is one line on stderr, then the conversion (of a file the user chose to trust).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mmer_ext", "convert", "evil.pkl", "out"], cwd=in_tmp, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 2, proc.stderr
    assert lines[0].startswith("mmer-ext convert: warning: evil.pkl: reading a pickle file executes")
    assert lines[0].endswith("[UnsafePickleWarning]") and lines[1].startswith("mmer-ext convert: error: ")
    assert "this conversion unpickles it once; then share and load 'mmsa-cache:DST_DIR'" in lines[0]


def test_the_warning_format_is_the_commands_only(in_tmp, capsys):
    import warnings

    before = warnings.formatwarning
    assert main(["info", "--json"]) == 0
    assert main([*TRAIN, "--lr", "inf"]) == 2
    assert warnings.formatwarning is before  # an embedding program keeps its own format


def test_malformed_overrides_are_named(in_tmp, capsys):
    assert main([*TRAIN, *DATA_FLAGS, "--out", "run", "--set", "hparams.main=3"]) == 2
    assert "hparams.main must map constructor arguments to values" in _one_line_error(capsys, "train")
    for override, key in (("data_options=5", "data_options"), ("eval_missing_rates=0.3", "eval_missing_rates"),
                          ("stage_epochs.main=abc", "stage_epochs.main")):
        assert main([*TRAIN, *DATA_FLAGS, "--out", "run", "--set", override]) == 2
        assert f"full_key: {key}" in _one_line_error(capsys, "train")
    assert not (in_tmp / "run").exists()
