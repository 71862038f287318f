"""Scale-invariant CMD inputs (mmer_ext.models.invariance) and the invariant-features study script (issue 15)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mmer_ext.models import UttShared
from mmer_ext.models.invariance import CMD_NORMALIZATIONS, normalize_for_cmd
from mmer_ext.models.nmer import NMERTeacher
from mmer_ext.ops import cmd_pairwise

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "invariant_features_study.py"


def _features(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 16, generator=g) * s + m for s, m in ((1.0, 0.0), (0.5, 0.3), (2.0, -0.2))]


@pytest.mark.parametrize("mode", CMD_NORMALIZATIONS)
def test_only_the_scale_invariant_modes_ignore_a_common_rescaling(mode):
    xs = _features()
    full = cmd_pairwise(normalize_for_cmd(xs, mode), 5)
    shrunk = cmd_pairwise(normalize_for_cmd([x * 0.01 for x in xs], mode), 5)
    if mode == "none":
        assert float(shrunk) < 0.05 * float(full)  # the way out the authors' CMD leaves open
    else:
        torch.testing.assert_close(shrunk, full, rtol=1e-4, atol=1e-6)


def test_pooled_keeps_relative_scales_and_l2_keeps_directions():
    xs = _features()
    pooled = normalize_for_cmd(xs, "pooled")
    ratio = [float(p.std() / x.std()) for p, x in zip(pooled, xs, strict=True)]
    assert max(ratio) - min(ratio) < 1e-5  # one common factor
    for y in normalize_for_cmd(xs, "l2"):
        torch.testing.assert_close(y.norm(dim=-1), torch.ones(32))
    assert normalize_for_cmd(xs, "none") == xs


def test_bad_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="cmd_normalize"):
        normalize_for_cmd(_features(), "zscore")
    with pytest.raises(ValueError, match="cmd_normalize"):
        UttShared((6, 5, 7), 4, cmd_normalize="zscore")


@pytest.mark.parametrize("cls", [UttShared, NMERTeacher])
def test_teachers_cmd_uses_the_option(cls):
    torch.manual_seed(0)
    inv = dict(zip("ALV", _features(), strict=True))
    plain, pooled = cls((6, 5, 7), 4), cls((6, 5, 7), 4, cmd_normalize="pooled")
    assert plain.cmd_normalize == "none"  # the authors' behaviour is the default
    small = {m: x * 0.01 for m, x in inv.items()}
    assert float(plain.cmd_loss(small)) < 0.05 * float(plain.cmd_loss(inv))
    torch.testing.assert_close(pooled.cmd_loss(small), pooled.cmd_loss(inv), rtol=1e-4, atol=1e-6)


def test_study_smoke_run(tmp_path, capsys):
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("invariant_features_study", SCRIPT)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    assert study.main(["--tiny", "--models", "ifmmin", "--modes", "none", "pooled", "--out", str(tmp_path / "out"),
                       "--work", str(tmp_path / "work")]) == 0
    (js,) = (tmp_path / "out").glob("*.json")
    data = json.loads(js.read_text())
    assert [(e["model"], e["mode"]) for e in data["summary"]] == [("ifmmin", "none"), ("ifmmin", "pooled")]
    assert len(data["runs"]) == 4 and all(0.0 <= r["probe_UA"] <= 1.0 and r["std"] > 0 for r in data["runs"])
    assert "| ifmmin | pooled |" in js.with_suffix(".md").read_text()
