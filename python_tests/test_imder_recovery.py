"""The IMDer recovery benchmark (benchmarks/imder_recovery.py) runs end to end in smoke mode, and its metrics give
the known answers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "imder_recovery.py"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _load_script():
    spec = importlib.util.spec_from_file_location("imder_recovery", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_every_method_bar_and_curve(tmp_path, capsys):
    bench = _load_script()
    assert bench.main(["--tiny", "--seeds", "0", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w")]) == 0
    [path] = (tmp_path / "out").glob("imder_recovery-*-tiny.json")
    payload = json.loads(path.read_text())
    fills = payload["aggregate"]["fills"]
    assert set(fills) == {"zero-fill", "mean-fill", "ridge", "em:4", "ddim:2"}
    for f in fills.values():
        for mode in ("raw", "refined"):
            assert set(f["recovery"][mode]) >= {"average"} and "pearson" in f["recovery"][mode]["average"]
            assert set(f["downstream"][mode]) == {"MR=0.3", "MR=0.5", "MR=0.7"}
    # zero-fill is all zeros: its MSE is the truth's mean square, its cosine 0
    zero = fills["zero-fill"]["recovery"]["raw"]["average"]
    assert zero["cosine"][0] == 0.0 and zero["MSE"][0] > 0
    assert len(payload["bars"]) >= 5 and payload["aggregate"]["end_to_end"]["speedup"][0] > 0
    assert [p["step"] for p in payload["aggregate"]["curves"][0]] == [0, 2, 4]
    # the seconds-against-calls line over the three samplers timed end to end (em:4, ddim:2 and ddim:1)
    [fit] = payload["aggregate"]["end_to_end"]["curve"]
    assert set(fit["points"]) == {"em:4", "ddim:2", "ddim:1"} and np.isfinite([fit["base"], fit["per_call"]]).all()
    assert (tmp_path / "out" / payload["figure"]).is_file()
    md = path.with_suffix(".md").read_text()
    assert "Tiny smoke run: not a result" in md and "| ridge |" in md and "## Bars" in md
    assert payload["torch"] == torch.__version__ and "cpu" in payload["device"]
    # --reuse reads the measured seed back instead of training again
    assert bench.main(["--tiny", "--seeds", "0", "--reuse", "--out", str(tmp_path / "out2"),
                       "--work", str(tmp_path / "w")]) == 0
    assert "read back" in capsys.readouterr().err


def test_metrics_known_answers():
    from mmer_ext.train import recovery as rec

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, 6, generator=g, dtype=torch.float64)
    mean = torch.zeros(4, 6, dtype=torch.float64)
    assert rec.pearson(x, x, mean) == pytest.approx(1.0)
    assert rec.pearson(-x, x, mean) == pytest.approx(-1.0)
    # the r -> r^2 identity: conditional mean mu has r; a sample mu + fresh noise has r^2
    mu = 0.6 * x + 0.8 * torch.randn(x.shape, generator=g, dtype=torch.float64)  # corr(mu, x) = 0.6
    truth = mu + 0.8 * torch.randn(x.shape, generator=g, dtype=torch.float64)  # truth = mu + e
    post = mu + 0.8 * torch.randn(x.shape, generator=g, dtype=torch.float64)   # a posterior sample
    r = rec.pearson(mu, truth, mean)
    assert rec.pearson(post, truth, mean) == pytest.approx(r**2, abs=0.03)
    f = rec.frames(x)
    assert f.shape == (400 * 6, 4)
    same = rec.mmd_rbf(f[:500], f[500:1000], 1.0)
    shifted = rec.mmd_rbf(f[:500], f[500:1000] + 1.0, 1.0)
    assert abs(same) < 0.02 < shifted
    assert rec.frechet(f[:1000], f[1000:2000]) < 0.1 < rec.frechet(f[:1000], 2 * f[1000:2000])
    assert rec.network_calls("pc:20") == 40 and rec.network_calls("ode-heun:10") == 19
    assert rec.network_calls("ddim:10") == 10
    assert rec.parse_sampler("ddim:10:eta=0.5") == ("ddim", 10, {"eta": 0.5})
    assert rec.parse_sampler("ddim:10:karras:eta=1") == ("ddim", 10, {"schedule": "karras", "eta": 1.0})
    assert rec.network_calls("pc:10:corrector_steps=2") == 30
    with pytest.raises(ValueError, match="NAME:STEPS"):
        rec.parse_sampler("ddim")
    with pytest.raises(ValueError, match="unknown option 'beta'"):
        rec.parse_sampler("ddim:10:beta=1")
