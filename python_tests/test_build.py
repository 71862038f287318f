"""The compiled library and the torch it runs against: the import-mismatch error path and ``build_info()``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mmer_ext
from mmer_ext import _build_info
from mmer_ext._build import REBUILD_HINT, check_compatible, compatibility_problems
from mmer_ext.info import arch_supported, build_info

PACKAGE_DIR = Path(mmer_ext.__file__).resolve().parent
NVCC = Path("/usr/local/cuda/bin/nvcc")
DEVICE_OPS = [
    "_central_moments_forward",
    "_central_moments_backward",
    "_cmd_pairwise_forward",
    "_cmd_pairwise_backward",
]


def _assert_rebuild_hint(message: str) -> None:
    assert REBUILD_HINT in message
    assert "pip install --no-build-isolation" in message  # the hint names a command, not just "rebuild"


# ---- compatibility_problems / check_compatible ----------------------------------------------------------------------


def test_same_versions_are_compatible():
    assert compatibility_problems("2.14.1", "13.0", True, "2.14.1", "13.0") == []


@pytest.mark.parametrize(
    "built, running",
    [("2.14.1+cu130", "2.14.0+cpu"), ("2.14.0", "2.14.3+cu128"), ("2.14.1a0+git1234", "2.14.1")],
)
def test_patch_and_local_suffixes_are_ignored(built, running):
    # The C++ ABI is stable within a minor release; "+cu130" or "+cpu" only name the wheel variant.
    assert compatibility_problems(built, None, False, running, None) == []


def test_cuda_minor_difference_is_compatible():
    assert compatibility_problems("2.14.1", "13.0", True, "2.14.1", "13.2") == []


def test_different_torch_minor_is_reported():
    problems = compatibility_problems("2.13.0+cu128", "12.8", False, "2.14.1+cu130", "13.0")
    assert len(problems) == 1
    assert "2.13.0+cu128" in problems[0] and "2.14.1+cu130" in problems[0]


def test_different_torch_major_is_reported():
    assert compatibility_problems("2.14.1", None, False, "3.14.1", None) != []


def test_different_cuda_major_is_reported():
    problems = compatibility_problems("2.14.1", "12.8", True, "2.14.1", "13.0")
    assert len(problems) == 1
    assert "12.8" in problems[0] and "13.0" in problems[0]


def test_cpu_only_torch_running_a_cuda_build_is_reported():
    problems = compatibility_problems("2.14.1+cu130", "13.0", True, "2.14.1+cpu", None)
    assert len(problems) == 1
    assert "13.0" in problems[0] and "no CUDA" in problems[0]


@pytest.mark.parametrize("running_cuda", [None, "12.8", "13.0"])
def test_cpu_only_build_runs_on_any_torch_of_its_minor(running_cuda):
    # Without CUDA kernels the build links no CUDA library, so torch's CUDA version does not matter.
    assert compatibility_problems("2.14.1+cpu", None, False, "2.14.1+cu130", running_cuda) == []


def _info(torch_version="2.14.1+cu130", cuda="13.0", with_cuda=True):
    return SimpleNamespace(torch_version=torch_version, torch_cuda_version=cuda, with_cuda=with_cuda)


def test_check_compatible_raises_importerror_naming_both_versions():
    with pytest.raises(ImportError) as err:
        check_compatible(_info("2.13.2+cu128", "12.8"), running_torch="2.14.1+cu130", running_cuda="13.0")
    message = str(err.value)
    assert "2.13.2+cu128" in message and "2.14.1+cu130" in message
    assert "12.8" in message and "13.0" in message  # the CUDA mismatch is reported in the same error
    _assert_rebuild_hint(message)


def test_check_compatible_reports_cpu_only_running_torch(monkeypatch):
    # running_cuda=None means "ask torch", so a CPU-only torch is simulated through torch.version.cuda.
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ImportError, match="no CUDA") as err:
        check_compatible(_info(), running_torch="2.14.1+cpu")
    _assert_rebuild_hint(str(err.value))


def test_check_compatible_defaults_to_the_running_torch(monkeypatch):
    check_compatible(_build_info)  # the installed build matches the torch of this test run
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    with pytest.raises(ImportError, match=r"2\.99\.0"):
        check_compatible(_build_info)


def test_check_compatible_accepts_matching_info():
    check_compatible(_info(), running_torch="2.14.1+cu130", running_cuda="13.0")


# ---- the import itself, in a fresh interpreter ----------------------------------------------------------------------


def _run_python(code: str, cwd: Path, path_first: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter of this venv, from ``cwd`` (never the source tree, whose mmer_ext/
    has no compiled library), with ``path_first`` ahead of everything on sys.path."""
    prelude = f"import sys; sys.path.insert(0, {str(path_first)!r})\n" if path_first else ""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


_IMPORT_AND_REPORT = """
import json
try:
    import mmer_ext
except ImportError as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
else:
    print(json.dumps({"error": None, "file": mmer_ext.__file__}))
"""


def _import_result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_with_other_torch_version_fails_clearly(tmp_path):
    proc = _run_python('import torch\ntorch.__version__ = "2.99.0"\n' + _IMPORT_AND_REPORT, tmp_path)
    result = _import_result(proc)
    assert result["error"] == "ImportError", result
    assert "2.99.0" in result["message"]
    assert _build_info.torch_version in result["message"]
    _assert_rebuild_hint(result["message"])


def _copy_package(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    shutil.copytree(PACKAGE_DIR, site / "mmer_ext", ignore=shutil.ignore_patterns("__pycache__"))
    return site


def test_import_of_a_copy_imports_the_copy(tmp_path):
    # Guards the two tests below: the sys.path trick really loads the copied package.
    site = _copy_package(tmp_path)
    result = _import_result(_run_python(_IMPORT_AND_REPORT, tmp_path, path_first=site))
    assert result["error"] is None, result
    assert Path(result["file"]).resolve().parent == (site / "mmer_ext").resolve()


def test_corrupt_compiled_library_fails_clearly(tmp_path):
    site = _copy_package(tmp_path)
    libraries = list((site / "mmer_ext").glob("_C*.so"))
    assert libraries, f"no compiled library in {PACKAGE_DIR}"
    for lib in libraries:
        lib.write_bytes(b"this is not an ELF file\n" * 64)
    result = _import_result(_run_python(_IMPORT_AND_REPORT, tmp_path, path_first=site))
    assert result["error"] == "ImportError", result
    assert "could not load its compiled library" in result["message"]
    assert str(site) in result["message"]  # the loader's reason names the broken file
    assert _build_info.torch_version in result["message"] and torch.__version__ in result["message"]
    _assert_rebuild_hint(result["message"])


def test_missing_build_info_fails_clearly(tmp_path):
    site = _copy_package(tmp_path)
    (site / "mmer_ext" / "_build_info.py").unlink()
    result = _import_result(_run_python(_IMPORT_AND_REPORT, tmp_path, path_first=site))
    assert result["error"] == "ImportError", result
    assert "no compiled library" in result["message"]
    _assert_rebuild_hint(result["message"])


# ---- build_info() ---------------------------------------------------------------------------------------------------


def test_build_info_agrees_with_torch_and_the_build():
    info = build_info()
    assert info["torch_running"] == torch.__version__
    assert info["torch_cuda_running"] == torch.version.cuda
    assert info["gpu_visible"] == torch.cuda.is_available()
    assert info["torch_threads"] == torch.get_num_threads()
    assert info["mmer_ext"] == mmer_ext.__version__ == _build_info.version
    assert info["torch_built_against"] == _build_info.torch_version
    assert info["torch_cuda_built_against"] == _build_info.torch_cuda_version
    assert info["cuda_kernels"] == _build_info.with_cuda
    assert info["cuda_arch_list"] == [a for a in _build_info.cuda_arch_list.split(",") if a]
    assert info["cxx_standard"] == _build_info.cxx_standard
    assert compatibility_problems(
        info["torch_built_against"], info["torch_cuda_built_against"], info["cuda_kernels"],
        info["torch_running"], info["torch_cuda_running"],
    ) == []
    assert len(info["gpus"]) == (torch.cuda.device_count() if info["gpu_visible"] else 0)
    json.dumps(info)  # `mmer-ext info --json` prints it


def test_package_version_matches_distribution_metadata():
    from importlib.metadata import version

    assert mmer_ext.__version__ == version("mmer_ext")


def test_cuda_kernels_claim_matches_the_dispatcher():
    # build_info() must not claim CUDA kernels that were never registered (or hide ones that were).
    registered = {
        op: torch._C._dispatch_has_kernel_for_dispatch_key(f"mmer_ext::{op}", "CUDA") for op in DEVICE_OPS
    }
    assert all(registered.values()) == build_info()["cuda_kernels"], registered
    assert len(set(registered.values())) == 1, f"CUDA kernels for only some ops: {registered}"


@pytest.mark.skipif(not (torch.version.cuda and NVCC.exists()), reason=f"needs a CUDA torch and {NVCC}")
def test_cuda_build_when_toolkit_present():
    # MMER_EXT_CUDA=AUTO must not silently fall back to a CPU-only build when torch has CUDA and nvcc exists.
    assert build_info()["cuda_kernels"]
    assert build_info()["cuda_arch_list"]
    for op in DEVICE_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mmer_ext::{op}", "CUDA"), op


@pytest.mark.cuda
def test_build_supports_the_visible_gpus():
    for gpu in build_info()["gpus"]:
        assert gpu["supported_by_build"], gpu


# ---- arch_supported -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "capability, arch_list, expected",
    [
        ((8, 6), ["8.0"], True),  # same major, newer minor runs sm_80 machine code
        ((8, 0), ["8.0"], True),
        ((8, 0), ["8.6"], False),  # older minor does not
        ((9, 0), ["8.0"], False),  # machine code never crosses a major version
        ((9, 0), ["8.0+PTX"], True),  # PTX is compiled on load for newer GPUs
        ((7, 5), ["8.0+PTX"], False),  # but not for older ones
        ((9, 0), ["9.0a"], True),
        ((10, 0), ["9.0a"], False),  # arch-specific code runs only on its own arch
        ((9, 0), ["8.0", "9.0a"], True),
        ((12, 1), ["12.0+PTX"], True),
        ((12, 1), ["8.0", "9.0", "10.0", "12.0+PTX"], True),
        ((12, 0), ["12.0f"], True),
        ((12, 0), [], False),
        ((8, 0), ["sm_80", "garbage", ""], False),  # unparsable entries are ignored, not fatal
        ((8, 0), [" 8.0 "], True),
    ],
)
def test_arch_supported(capability, arch_list, expected):
    assert arch_supported(capability, arch_list) is expected


# ---- the command line without a usable compiled library -------------------------------------------------------------


def _run_cli(site: Path, cwd: Path, args: list[str], torch_version: str | None = None) -> subprocess.CompletedProcess:
    """Run the command line from the package copy in ``site``: as ``python -m mmer_ext`` or, when the running torch
    version is to be faked, through a console script named ``mmer-ext`` (as pip writes it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    if torch_version is None:
        command = [sys.executable, "-m", "mmer_ext", *args]
    else:
        script = cwd / "bin" / "mmer-ext"
        script.parent.mkdir(exist_ok=True)
        script.write_text(f"import sys\nimport torch\ntorch.__version__ = {torch_version!r}\n"
                          "from mmer_ext.cli import main\nsys.exit(main())\n")
        command = [sys.executable, str(script), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def site_without_library(tmp_path):
    site = _copy_package(tmp_path)
    libraries = list((site / "mmer_ext").glob("_C*.so"))
    assert libraries, f"no compiled library in {PACKAGE_DIR}"
    for lib in libraries:
        lib.unlink()
    return site


def test_cli_help_without_the_library(tmp_path, site_without_library):
    proc = _run_cli(site_without_library, tmp_path, ["--help"])
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "evaluate", "demo", "convert", "info"):
        assert command in proc.stdout
    proc = _run_cli(site_without_library, tmp_path, ["train", "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "--model" in proc.stdout and "Traceback" not in proc.stderr


def test_cli_info_without_the_library_says_what_is_wrong(tmp_path, site_without_library):
    proc = _run_cli(site_without_library, tmp_path, ["info"])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "compiled library (_C*.so) is missing" in proc.stdout
    assert str(site_without_library) in proc.stdout  # where it looked
    _assert_rebuild_hint(proc.stdout)
    report = json.loads(_run_cli(site_without_library, tmp_path, ["info", "--json"]).stdout)
    assert report["library_loaded"] is False
    assert report["torch_built_against"] == _build_info.torch_version
    assert report["torch_running"] == torch.__version__
    assert report["mmer_ext"] == _build_info.version


def test_cli_other_commands_without_the_library_fail_in_one_line(tmp_path, site_without_library):
    proc = _run_cli(site_without_library, tmp_path, ["train", "--epochs", "1", "--out", str(tmp_path / "run")])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("mmer-ext train: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "run").exists()


def test_cli_info_with_another_torch_names_both_versions(tmp_path):
    site = _copy_package(tmp_path)
    proc = _run_cli(site, tmp_path, ["info"], torch_version="2.99.0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "2.99.0" in proc.stdout and _build_info.torch_version in proc.stdout
    _assert_rebuild_hint(proc.stdout)
    proc = _run_cli(site, tmp_path, ["--help"], torch_version="2.99.0")
    assert proc.returncode == 0 and "usage: mmer-ext" in proc.stdout, proc.stderr


def test_cli_info_with_a_working_library_still_reports_the_build(tmp_path):
    # The console-script path with the real torch version: the ordinary report, exit 0.
    proc = _run_cli(_copy_package(tmp_path), tmp_path, ["info"], torch_version=torch.__version__)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"mmer_ext {_build_info.version}")


def test_library_users_still_get_the_import_error(tmp_path, site_without_library):
    # Only the command line may start without the library; `import mmer_ext` from code must fail loudly.
    result = _import_result(_run_python(_IMPORT_AND_REPORT, tmp_path, path_first=site_without_library))
    assert result["error"] == "ImportError" and "missing" in result["message"], result


@pytest.mark.parametrize(
    "argv0, orig_argv, expected",
    [
        ("/venv/bin/mmer-ext", ["/venv/bin/python", "/venv/bin/mmer-ext", "info"], True),
        ("-m", ["python", "-m", "mmer_ext", "info"], True),
        ("-m", ["python", "-X", "dev", "-m", "mmer_ext", "--help"], True),
        ("-c", ["python", "-c", "import mmer_ext"], False),
        ("train.py", ["python", "train.py"], False),
        ("-m", ["python", "-m", "pytest", "mmer_ext"], False),
    ],
)
def test_started_as_cli(argv0, orig_argv, expected):
    from mmer_ext._build import started_as_cli

    assert started_as_cli(argv0, orig_argv) is expected
