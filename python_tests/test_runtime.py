"""The thread policy (mmer_ext.runtime) and the --threads option: CPU counts and load are injected, nothing is timed."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from mmer_ext import runtime
from mmer_ext.cli import build_parser, main
from mmer_ext.runtime import choose_threads, configure_threads, oversubscribed, usable_cpus


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------------------
# usable CPUs


def test_usable_cpus_caps_affinity_by_cgroup_quota():
    assert usable_cpus(affinity=8, cgroup_limit=2.0) == 2
    assert usable_cpus(affinity=8, cgroup_limit=1.5) == 2  # a fractional quota still runs two threads part-time
    assert usable_cpus(affinity=2, cgroup_limit=16.0) == 2
    assert usable_cpus(affinity=3, cgroup_limit=0.25) == 1


def test_usable_cpus_defaults_to_this_process():
    assert 1 <= usable_cpus() <= len(__import__("os").sched_getaffinity(0))


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "200000 100000\n"}, 2.0),
        ({"cpu.max": "50000 100000\n"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
        ({"cpu.max": "garbage\n"}, None),
    ],
)
def test_cgroup_cpu_limit(tmp_path, files, expected):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert runtime._cgroup_cpu_limit(tmp_path) == expected


# --------------------------------------------------------------------------------------------------------------
# the choice


def test_oversubscribed_threshold():
    assert not oversubscribed(None, 2)
    assert not oversubscribed(3.0, 2)  # 1.5 per CPU is the limit, not above it
    assert oversubscribed(3.01, 2)
    assert oversubscribed(8.5, 2)
    assert not oversubscribed(8.5, 16)


def test_quiet_machine_uses_every_usable_cpu():
    choice = choose_threads(cpus=4, load=0.5, environ={})
    assert (choice.threads, choice.reason, choice.warning) == (4, "usable CPUs", None)


def test_oversubscribed_machine_with_spinning_threads_uses_one_thread_and_warns_in_one_line():
    for environ in ({}, {"OMP_WAIT_POLICY": "ACTIVE"}):
        choice = choose_threads(cpus=2, load=8.7, environ=environ)
        assert (choice.threads, choice.reason) == (1, "oversubscribed")
        assert choice.warning is not None and "\n" not in choice.warning
        assert "load average 8.7 on 2 usable CPUs" in choice.warning and "--threads" in choice.warning


def test_oversubscribed_machine_with_passive_threads_keeps_every_cpu_but_warns():
    choice = choose_threads(cpus=2, load=8.7, environ={"OMP_WAIT_POLICY": "passive"})
    assert (choice.threads, choice.reason) == (2, "usable CPUs")
    assert "using 2 torch threads with OMP_WAIT_POLICY=PASSIVE" in choice.warning


def test_requested_threads_win_but_the_warning_stays():
    choice = choose_threads(3, cpus=2, load=8.7, environ={"OMP_NUM_THREADS": "1"})
    assert (choice.threads, choice.reason) == (3, "requested")
    assert "as asked" in choice.warning and "1 thread is much faster" in choice.warning
    passive = choose_threads(3, cpus=2, load=8.7, environ={"OMP_WAIT_POLICY": "PASSIVE"})
    assert "as asked" in passive.warning and "much faster" not in passive.warning
    assert choose_threads(3, cpus=2, load=0.1, environ={}).warning is None


def test_omp_num_threads_is_the_users_choice():
    assert choose_threads(cpus=8, load=0.0, environ={"OMP_NUM_THREADS": "3"}).threads == 3
    assert choose_threads(cpus=2, load=9.0, environ={"OMP_NUM_THREADS": "2"}).reason == "OMP_NUM_THREADS"
    # Not a positive integer (e.g. a per-level list "4,2"): ignored, the automatic default applies.
    for bad in ("0", "-2", "4,2", ""):
        assert choose_threads(cpus=2, load=9.0, environ={"OMP_NUM_THREADS": bad}).threads == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_requested_threads_name_the_option(bad):
    with pytest.raises(ValueError, match="--threads must be a positive integer"):
        choose_threads(bad, cpus=2, load=0.0, environ={})


def test_configure_threads_sets_torch_and_warns(restore_threads):
    with pytest.warns(RuntimeWarning, match="oversubscribed"):
        choice = configure_threads(cpus=2, load=9.0, environ={})
    assert choice.threads == torch.get_num_threads() == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        configure_threads(2, cpus=2, load=0.0, environ={})
    assert torch.get_num_threads() == 2


# --------------------------------------------------------------------------------------------------------------
# the command line


@pytest.mark.parametrize("command", ["train", "evaluate", "demo"])
def test_threads_option_on_the_computing_commands(command):
    extra = ["ckpt.safetensors"] if command == "evaluate" else []
    args = build_parser().parse_args([command, *extra, "--threads", "3"])
    assert args.threads == 3
    assert build_parser().parse_args([command, *extra]).threads is None


@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_threads_option_rejects_non_positive(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["demo", "--threads", bad])
    assert exc.value.code == 2
    assert "--threads: must be a positive integer" in capsys.readouterr().err


def test_info_has_no_threads_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["info", "--threads", "2"])


def test_main_applies_threads_before_the_command_and_warns_once(monkeypatch, restore_threads):
    import mmer_ext.cli.demo as demo_cli

    seen = {}

    def fake_run(args):
        seen["threads"] = torch.get_num_threads()
        return 0

    monkeypatch.setattr(demo_cli, "run", fake_run)
    monkeypatch.setattr(runtime, "load_average", lambda: 42.0)
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with pytest.warns(RuntimeWarning) as record:
        assert main(["demo"]) == 0
    assert seen["threads"] == 1
    messages = [str(w.message) for w in record if "oversubscribed" in str(w.message)]
    assert len(messages) == 1
    assert messages[0].startswith("the machine is oversubscribed (load average 42.0 on 2 usable CPUs)")

    with pytest.warns(RuntimeWarning, match="as asked"):
        assert main(["demo", "--threads", "2"]) == 0
    assert seen["threads"] == 2


# --------------------------------------------------------------------------------------------------------------
# OMP_WAIT_POLICY for the command line


@pytest.mark.parametrize(
    ("argv0", "orig_argv", "environ", "torch_loaded", "expected"),
    [
        ("/venv/bin/mmer-ext", [], {}, False, "PASSIVE"),
        ("-m", ["python", "-m", "mmer_ext", "train"], {}, False, "PASSIVE"),
        ("-m", ["python", "-m", "mmer_ext", "train"], {"OMP_WAIT_POLICY": "ACTIVE"}, False, "ACTIVE"),  # user's
        ("-m", ["python", "-m", "mmer_ext", "train"], {}, True, None),  # too late: libgomp has read the environment
        ("script.py", ["python", "script.py"], {}, False, None),  # a program importing the package keeps its own
    ],
)
def test_prefer_passive_wait(argv0, orig_argv, environ, torch_loaded, expected):
    changed = runtime.prefer_passive_wait(environ, argv0=argv0, orig_argv=orig_argv, torch_loaded=torch_loaded)
    assert environ.get("OMP_WAIT_POLICY") == expected
    assert changed == (expected == "PASSIVE" and argv0 != "script.py" and not torch_loaded)


@pytest.mark.skipif(not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info(),
                    reason="the check reads libgomp's OMP_DISPLAY_ENV report (torch's OpenMP runtime on Linux)")
def test_command_line_starts_libgomp_without_spinning(tmp_path):
    # What libgomp itself took: its start-up report lists the spin count (300000 by default, 0 under PASSIVE).
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    proc = subprocess.run([sys.executable, "-m", "mmer_ext", "info"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "GOMP_SPINCOUNT = '0'" in proc.stderr
