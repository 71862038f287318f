"""The few-step vs 100-step IMDer study script (benchmarks/imder_sampler_study.py) runs end to end in smoke mode."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "imder_sampler_study.py"


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)


def _load_script():
    spec = importlib.util.spec_from_file_location("imder_sampler_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_smoke_run_writes_both_questions(tmp_path, capsys):
    study = _load_script()
    assert study.main(["--tiny", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 0
    [payload_path] = (tmp_path / "out").glob("imder_sampler_study-*-tiny.json")
    payload = json.loads(payload_path.read_text())
    assert payload["tiny"] and set(payload["recovery"]) == {"em:4", "ddim:2"}
    assert payload["recovery"]["em:4"]["recovery_MSE_vs_reference"] == 0.0
    for r in payload["recovery"].values():
        assert r["metrics"]["average"]["recovery_MSE"] > 0 and r["seconds"] > 0
    e2e = payload["end_to_end"]
    assert e2e["reference"]["seconds"] > 0 and e2e["fast"]["seconds"] > 0
    assert e2e["speedup_missing_stage_and_test"] == pytest.approx(e2e["reference"]["seconds"] / e2e["fast"]["seconds"])
    md = payload_path.with_suffix(".md").read_text()
    assert "Tiny smoke run: not a result" in md and "| ddim:2 |" in md
    assert "End to end" in capsys.readouterr().out


def test_sampler_specs_parse_and_reject_nonsense():
    study = _load_script()
    assert study.parse_sampler("ddim:10:karras") == ("ddim", 10, {"schedule": "karras"})
    assert study.parse_sampler("em:100") == ("em", 100, {})
    with pytest.raises(ValueError, match="NAME:STEPS"):
        study.parse_sampler("ddim")
