"""The ``mmer-ext`` command line: ``python -m mmer_ext info`` and the console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmer_ext.cli import main
from mmer_ext.info import build_info


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # From a temporary directory: run from the repository root, `-m mmer_ext` would find the source tree's
    # mmer_ext/ (no compiled library) before the installed package.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _check_text_report(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr
    assert torch.__version__ in proc.stdout
    assert "CUDA kernels" in proc.stdout
    expected = "on" if build_info()["cuda_kernels"] else "off"
    lines = [line for line in proc.stdout.splitlines() if "CUDA kernels" in line]
    assert lines and lines[0].split(":", 1)[1].strip().startswith(expected), proc.stdout


def test_module_info(tmp_path):
    _check_text_report(_run([sys.executable, "-m", "mmer_ext", "info"], tmp_path))


def test_module_info_json(tmp_path):
    proc = _run([sys.executable, "-m", "mmer_ext", "info", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    expected = build_info()
    assert set(info) == set(expected)
    for key in ("mmer_ext", "torch_running", "torch_built_against", "cuda_kernels", "cuda_arch_list", "gpu_visible"):
        assert info[key] == expected[key], key


def test_console_script_info(tmp_path):
    script = shutil.which("mmer-ext", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip(f"no mmer-ext console script next to {sys.executable}")
    _check_text_report(_run([script, "info"], tmp_path))


def test_main_json_in_process(capsys):
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == build_info()


def test_main_without_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "usage: mmer-ext" in capsys.readouterr().err
