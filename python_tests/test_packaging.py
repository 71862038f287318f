"""What a wheel promises: its version names the torch and CUDA it was built for, its metadata pins that torch, and
it carries the licence; the citation file and changelog are well-formed.

The metadata is written by build_tools/mmer_ext_metadata.py (a scikit-build-core dynamic-metadata provider). The
expected values here are derived by hand from torch and the build record, not with the provider's own functions.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from importlib.metadata import metadata
from pathlib import Path

import pytest
import torch

import mmer_ext
from mmer_ext import _build_info

REPO = Path(__file__).resolve().parents[1]


def _base_version() -> str:
    import tomllib

    (entry,) = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["dynamic-metadata"]
    return entry["version"]


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _expected_tag(torch_version: str, torch_cuda: str | None, cuda_kernels: bool) -> str:
    pt = "pt" + _major_minor(torch_version).replace(".", "")
    return pt + ("cu" + torch_cuda.replace(".", "") if cuda_kernels else "cpu")


def _torch_pins(requires: list[str]) -> list[str]:
    return [r for r in requires if re.match(r"torch\b", r)]


def _load_provider():
    spec = importlib.util.spec_from_file_location("mmer_ext_metadata", REPO / "build_tools" / "mmer_ext_metadata.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the installed distribution (in CI: the wheel `make build` just built and installed) ---------------------------


def test_installed_metadata_names_the_build_torch():
    meta = metadata("mmer_ext")
    tag = _expected_tag(_build_info.torch_version, _build_info.torch_cuda_version, _build_info.with_cuda)
    assert meta["Version"] == f"{_base_version()}+{tag}", meta["Version"]
    assert meta["Version"] == mmer_ext.__version__ == _build_info.version
    assert _torch_pins(meta.get_all("Requires-Dist")) == [f"torch=={_major_minor(_build_info.torch_version)}.*"]
    assert meta["License-Expression"] == "MIT"


def test_running_torch_satisfies_the_pin():
    from packaging.requirements import Requirement

    (pin,) = _torch_pins(metadata("mmer_ext").get_all("Requires-Dist"))
    assert Requirement(pin).specifier.contains(torch.__version__, prereleases=True)


# ---- the provider through scikit-build-core's PEP 517 hooks, without compiling (seconds) ---------------------------


def _hook(name: str, out: Path, env: dict[str, str]) -> Path:
    """Run a scikit-build-core PEP 517 hook on the source tree in a fresh interpreter; the file or folder it wrote."""
    code = f"from scikit_build_core import build; print(build.{name}({str(out)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out / proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("cuda_mode", ["OFF", "ON"])
def test_wheel_metadata_pins_torch_and_tags_the_kernels(tmp_path, cuda_mode):
    pytest.importorskip("scikit_build_core")
    if cuda_mode == "ON" and not torch.version.cuda:
        pytest.skip("a CUDA build needs a CUDA torch")
    dist_info = _hook("prepare_metadata_for_build_wheel", tmp_path, {"MMER_EXT_CUDA": cuda_mode})
    meta = Parser().parsestr((dist_info / "METADATA").read_text())
    tag = _expected_tag(torch.__version__, torch.version.cuda, cuda_mode == "ON")
    assert meta["Version"] == f"{_base_version()}+{tag}"
    assert dist_info.name == f"mmer_ext-{_base_version()}+{tag}.dist-info"
    assert _torch_pins(meta.get_all("Requires-Dist")) == [f"torch=={_major_minor(torch.__version__)}.*"]
    assert "numpy>=1.24" in meta.get_all("Requires-Dist")  # the static dependencies are kept
    assert meta["License-Expression"] == "MIT" and meta["License-File"] == "LICENSE"


def test_sdist_names_no_torch_and_ships_what_a_build_needs(tmp_path):
    pytest.importorskip("scikit_build_core")
    sdist = _hook("build_sdist", tmp_path, {})
    assert sdist.name == f"mmer_ext-{_base_version()}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = Parser().parsestr(tar.extractfile(f"mmer_ext-{_base_version()}/PKG-INFO").read().decode())
    assert pkg_info["Version"] == _base_version()
    assert _torch_pins(pkg_info.get_all("Requires-Dist")) == ["torch>=2.9"]
    assert "Requires-Dist" in (pkg_info.get_all("Dynamic") or [])  # a wheel built from it pins its builder's torch
    for needed in ("LICENSE", "CITATION.cff", "CHANGELOG.md", "build_tools/mmer_ext_metadata.py", "CMakeLists.txt"):
        assert needed in names, needed


@pytest.mark.slow
def test_built_wheel_metadata_and_version_agree(tmp_path):
    # A real CPU-only build (about a minute on 2 cores with a warm compiler cache, several without).
    env = {**os.environ, "MMER_EXT_CUDA": "OFF"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
         "-C", f"build-dir={tmp_path / 'build'}", "-w", str(tmp_path / "dist"), str(REPO)],
        env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    tag = _expected_tag(torch.__version__, torch.version.cuda, False)
    assert wheel.name.startswith(f"mmer_ext-{_base_version()}+{tag}-")
    with zipfile.ZipFile(wheel) as zf:
        meta = Parser().parsestr(zf.read(f"mmer_ext-{_base_version()}+{tag}.dist-info/METADATA").decode())
        build_info = zf.read("mmer_ext/_build_info.py").decode()
        assert f"mmer_ext-{_base_version()}+{tag}.dist-info/licenses/LICENSE" in zf.namelist()
    assert meta["Version"] == f"{_base_version()}+{tag}"
    assert _torch_pins(meta.get_all("Requires-Dist")) == [f"torch=={_major_minor(torch.__version__)}.*"]
    # mmer_ext.__version__ comes from the same string (the compiled library and _build_info.py).
    assert f'version = "{_base_version()}+{tag}"' in build_info


@pytest.mark.slow
def test_cmake_stops_a_build_that_contradicts_its_version(tmp_path):
    # The metadata reads MMER_EXT_CUDA from the environment (ON: a cu tag); CMake is told OFF by -C cmake.define.
    # Only CMake's configure step runs before the error (a minute at most).
    if not torch.version.cuda:
        pytest.skip("needs a CUDA torch (with a CPU torch every build is +cpu)")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-v",
         "-C", f"build-dir={tmp_path / 'build'}", "-C", "cmake.define.MMER_EXT_CUDA=OFF",
         "-w", str(tmp_path / "dist"), str(REPO)],
        env={**os.environ, "MMER_EXT_CUDA": "ON"}, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode != 0
    output = " ".join((proc.stdout + proc.stderr).split())
    tag = _expected_tag(torch.__version__, torch.version.cuda, True)
    assert f"promises '{tag}'" in output and "environment variables" in output, output[-3000:]
    assert not list((tmp_path / "dist").glob("*.whl"))


# ---- the provider's prediction of CMake's CUDA decision -------------------------------------------------------------


def _fake_toolkit(root: Path, release: str) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.0'\n")
    nvcc.chmod(0o755)
    return root


@pytest.mark.parametrize(
    "mode, torch_cuda, toolkit, expected",
    [
        ("OFF", "13.0", "13.0", False),
        ("AUTO", None, "13.0", False),  # a CPU-only torch gets CPU kernels
        ("AUTO", "13.0", None, False),  # no toolkit
        ("AUTO", "13.0", "12.8", False),  # nvcc of another CUDA major
        ("AUTO", "13.0", "13.1", True),
        ("auto", "12.8", "12.4", True),
        ("ON", "13.0", None, True),  # ON promises kernels; CMake stops if it cannot build them
    ],
)
def test_cuda_prediction_follows_cmake_rules(tmp_path, mode, torch_cuda, toolkit, expected):
    provider = _load_provider()
    env = {"MMER_EXT_CUDA": mode, "PATH": str(tmp_path / "empty")}
    if toolkit:
        env["CUDA_HOME"] = str(_fake_toolkit(tmp_path / "cuda", toolkit))
    # Without the system locations (/usr/local/cuda, /opt/cuda), which would decide the no-toolkit case here.
    assert provider.cuda_kernels_expected(torch_cuda, env, system_roots=()) is expected


def test_cuda_prediction_rejects_unknown_mode():
    with pytest.raises(ValueError, match="MMER_EXT_CUDA"):
        _load_provider().cuda_kernels_expected("13.0", {"MMER_EXT_CUDA": "yes"})


def test_nvcc_on_path_is_found_through_its_real_location(tmp_path):
    # A wrapper on PATH (a symlink here) leads to the toolkit root, as in cmake/CUDASetup.cmake.
    provider = _load_provider()
    root = _fake_toolkit(tmp_path / "toolkit", "13.0")
    (tmp_path / "wrappers").mkdir()
    (tmp_path / "wrappers" / "nvcc").symlink_to(root / "bin" / "nvcc")
    assert provider.find_cuda_root({"PATH": str(tmp_path / "wrappers")}, system_roots=()) == root.resolve()
    assert provider.find_cuda_root({"PATH": str(tmp_path / "empty")}, system_roots=()) is None


# ---- licence, citation, changelog -----------------------------------------------------------------------------------


def test_license_is_mit_and_matches_the_metadata():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "mmer_ext contributors" in text
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]


def test_citation_file_is_valid_cff():
    import yaml

    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    for key in ("cff-version", "message", "title", "authors", "type", "license", "version"):
        assert key in cff, key
    assert cff["cff-version"] == "1.2.0"
    assert cff["title"] == "mmer_ext" and cff["license"] == "MIT" and cff["type"] == "software"
    assert cff["version"] == _base_version()
    refs = cff["references"]
    assert len(refs) == 5
    for ref in refs:
        for key in ("type", "title", "authors", "year", "repository-code"):
            assert key in ref, (ref.get("title"), key)
        assert ref["authors"] and all("family-names" in a for a in ref["authors"]), ref["title"]
        assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", ref["repository-code"]), ref["repository-code"]
        assert isinstance(ref["year"], int)


def test_changelog_follows_keep_a_changelog():
    text = (REPO / "CHANGELOG.md").read_text()
    assert "keepachangelog.com" in text and "semver.org" in text
    assert re.search(r"^## \[Unreleased\]$", text, re.M)
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - (\d{4}-\d{2}-\d{2})$", text, re.M)
    assert _base_version() in [v for v, _ in released], released
    for section in re.findall(r"^### (\w+)$", text, re.M):
        assert section in {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}, section
