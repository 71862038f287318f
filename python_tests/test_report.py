"""mmer_ext.report: table layout and values, CSV/JSON round trips, PNG figures, atomic writes, markdown report."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from mmer_ext import report
from mmer_ext.report import (
    MISSING_CELL,
    TABLE_CONDITIONS,
    atomic_open,
    atomic_write_text,
    format_table,
    markdown_table,
    plot_embedding_projection,
    plot_ua_per_condition,
    results_table,
    table_columns,
    write_report_md,
    write_results_json,
    write_table_csv,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIX = ("{a}", "{v}", "{l}", "{a,v}", "{a,l}", "{v,l}")


def _results():
    """Two models: a complete one with its average, and a partial one (no average, missing cells)."""
    full = {cond: {"WA": 0.5 + 0.01 * i, "UA": 0.4 + 0.01 * i, "F1": 0.3} for i, cond in enumerate(SIX)}
    full["average"] = {"WA": 0.525, "UA": 0.425, "F1": 0.3}
    full["{a,v,l}"] = {"WA": 0.756789, "UA": 0.701234, "F1": 0.7}
    full["overall"] = {"WA": 0.1, "UA": 0.1}  # not a table column
    partial = {"{a}": {"WA": 0.61, "UA": float("nan")}, "{a,v,l}": {"WA": 0.8}}
    return {"MMIN": full, "baseline": partial}


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _assert_png(path: Path):
    data = Path(path).read_bytes()
    assert len(data) > 100
    assert data[:8] == PNG_MAGIC


def test_column_order_is_the_papers():
    assert TABLE_CONDITIONS == ("{a}", "{v}", "{l}", "{a,v}", "{a,l}", "{v,l}", "average", "{a,v,l}")
    cols = table_columns()
    assert cols[:3] == ["model", "{a} WA", "{a} UA"]
    assert cols[-4:] == ["average WA", "average UA", "{a,v,l} WA", "{a,v,l} UA"]
    assert len(cols) == 1 + 2 * 8


def test_results_table_values():
    rows = results_table(_results())
    assert rows[0] == table_columns()
    mmin = dict(zip(rows[0], rows[1]))
    assert rows[1][0] == "MMIN"
    assert mmin["{a} WA"] == 50.0 and mmin["{a} UA"] == 40.0
    assert mmin["{v,l} WA"] == 55.0 and mmin["{v,l} UA"] == 45.0
    assert mmin["average WA"] == 52.5  # the stored average, not recomputed
    assert mmin["{a,v,l} WA"] == 75.68 and mmin["{a,v,l} UA"] == 70.12  # percent, 2 decimals
    base = dict(zip(rows[0], rows[2]))
    assert base["{a} WA"] == 61.0
    assert math.isnan(base["{a} UA"]) and math.isnan(base["{v} WA"]) and math.isnan(base["average WA"])
    assert base["{a,v,l} WA"] == 80.0 and math.isnan(base["{a,v,l} UA"])


def test_results_table_derives_missing_average():
    res = {"m": {cond: {"WA": v, "UA": v} for cond, v in zip(SIX, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])}}
    row = dict(zip(*results_table(res)))
    assert row["average WA"] == 35.0 and row["average UA"] == 35.0
    assert math.isnan(row["{a,v,l} WA"])


def test_results_table_other_metrics_and_bad_input():
    rows = results_table(_results(), metrics=("F1",))
    assert rows[0] == ["model"] + [f"{c} F1" for c in TABLE_CONDITIONS]
    assert rows[1][-1] == 70.0
    with pytest.raises(TypeError):
        results_table({"m": [0.1, 0.2]})
    with pytest.raises(ValueError, match="number"):
        results_table({"m": {"{a}": {"WA": "high"}}})


def test_format_table_console():
    text = format_table(_results())
    lines = text.splitlines()
    # Header line 1: conditions in order; line 2: the metrics.
    positions = [lines[0].index(c) for c in TABLE_CONDITIONS]
    assert positions == sorted(positions)
    assert lines[1].split("|")[0].strip() == "model"
    assert lines[1].count("WA") == 8 and lines[1].count("UA") == 8
    assert "75.68" in lines[3] and "70.12" in lines[3]
    assert MISSING_CELL in lines[4] and "nan" not in text.lower()
    # Single-metric and single-model tables work too.
    assert "53.83" not in format_table({"only": {"{a}": {"UA": 0.5}}}, metrics=("UA",))


def test_markdown_table():
    md = markdown_table(_results())
    lines = md.strip().splitlines()
    assert lines[0] == "| " + " | ".join(["Model"] + table_columns()[1:]) + " |"
    assert lines[1].startswith("|:---|---:|")
    assert lines[2].startswith("| MMIN | 50.00 | 40.00 | 51.00 | 41.00 |")
    assert lines[2].endswith("| 52.50 | 42.50 | 75.68 | 70.12 |")
    assert lines[3].startswith(f"| baseline | 61.00 | {MISSING_CELL} |")
    assert len(lines) == 4


def test_csv_round_trip(tmp_path):
    path = write_table_csv(tmp_path / "table.csv", _results())
    with open(path, newline="") as fh:
        got = list(csv.reader(fh))
    rows = results_table(_results())
    assert got[0] == rows[0]
    for g, r in zip(got[1:], rows[1:]):
        assert g[0] == r[0]
        back = [float(x) if x else math.nan for x in g[1:]]
        np.testing.assert_array_equal(np.array(back), np.array(r[1:], dtype=float))
    assert _files(tmp_path) == ["table.csv"]


@dataclasses.dataclass(frozen=True)
class _Stage:
    name: str
    model: type
    lr: float


def test_json_round_trip_with_metadata(tmp_path):
    payload = {
        "results": _results(),
        "predictions": torch.tensor([0, 1, 2]),
        "confusion": np.eye(2, dtype=np.int64),
        "loss": np.float32(0.25),
        "out_dir": tmp_path,
    }
    cfg = {"recipe": (_Stage("teacher", torch.nn.Linear, 2e-4),), "folds": {1, 3, 2}}
    path = write_results_json(tmp_path / "results.json", payload, seeds=[0, 1], config=cfg, timings={"train_s": 1.5})

    def _no_constants(name):  # the file must be strict JSON: no NaN/Infinity tokens
        raise AssertionError(f"non-standard JSON constant {name}")

    doc = json.loads(path.read_text(), parse_constant=_no_constants)
    assert doc["results"]["MMIN"]["{a,v,l}"] == {"WA": 0.756789, "UA": 0.701234, "F1": 0.7}
    assert doc["results"]["baseline"]["{a}"]["UA"] is None  # NaN -> null
    assert doc["predictions"] == [0, 1, 2] and doc["confusion"] == [[1, 0], [0, 1]] and doc["loss"] == 0.25
    assert doc["out_dir"] == str(tmp_path)
    meta = doc["meta"]
    assert meta["seeds"] == [0, 1] and meta["timings"] == {"train_s": 1.5}
    assert meta["config"]["folds"] == [1, 2, 3]
    assert meta["config"]["recipe"][0] == {"name": "teacher", "model": "torch.nn.modules.linear.Linear", "lr": 2e-4}
    assert "created_utc" in meta and "numpy" in meta["environment"]
    assert _files(tmp_path) == ["results.json"]


def test_omegaconf_config_is_converted():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"a": 1, "b": "${a}", "c": [1, 2]})
    assert report.to_jsonable(cfg) == {"a": 1, "b": 1, "c": [1, 2]}


def test_failed_json_write_keeps_old_file(tmp_path):
    path = tmp_path / "results.json"
    write_results_json(path, {"v": 1})
    old = path.read_bytes()
    # An unconvertible object: the conversion fails before anything is written.
    with pytest.raises(TypeError, match=r"payload\['bad'\]"):
        write_results_json(path, {"v": 2, "bad": object()})
    assert path.read_bytes() == old
    assert _files(tmp_path) == ["results.json"]


def test_failure_during_serialisation_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_results_json(path, {"v": 1})
    old = path.read_bytes()

    def half_dump(obj, fh, **kwargs):  # writes part of the document into the temp file, then fails
        fh.write('{"v": 2, "trunc')
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report.records.json, "dump", half_dump)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_results_json(path, {"v": 2})
    assert path.read_bytes() == old
    assert _files(tmp_path) == ["results.json"]


def test_failed_figure_keeps_old_png(tmp_path, monkeypatch):
    path = plot_ua_per_condition(tmp_path / "ua.png", _results())
    old = path.read_bytes()
    from matplotlib.figure import Figure

    def broken_savefig(self, fh, **kwargs):
        fh.write(PNG_MAGIC)
        raise OSError("renderer crashed")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="renderer crashed"):
        plot_ua_per_condition(path, _results())
    assert path.read_bytes() == old
    assert _files(tmp_path) == ["ua.png"]


def test_atomic_open_semantics(tmp_path):
    path = tmp_path / "sub" / "x.txt"  # parent directories are created
    atomic_write_text(path, "old\n")
    with pytest.raises(KeyError):
        with atomic_open(path, "w") as fh:
            fh.write("new, partial")
            raise KeyError("boom")
    assert path.read_text() == "old\n"
    assert _files(path.parent) == ["x.txt"]
    # A new file gets ordinary permissions (umask), not mkstemp's private 0o600; an existing one keeps its own.
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    os.chmod(path, 0o640)
    report.atomic_write_bytes(path, b"bytes")
    assert path.read_bytes() == b"bytes" and stat.S_IMODE(path.stat().st_mode) == 0o640
    with pytest.raises(ValueError, match="modes"):
        with atomic_open(path, "a"):
            pass


@pytest.mark.parametrize("n_models", [1, 5])
def test_ua_bar_chart_png(tmp_path, n_models):
    base = _results()
    res = {f"model {i}": base["MMIN" if i % 2 == 0 else "baseline"] for i in range(n_models)}
    path = plot_ua_per_condition(tmp_path / "figs" / "ua.png", res)
    _assert_png(path)
    assert _files(path.parent) == ["ua.png"]


def _embeddings(n=40, d=8, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, d, generator=g) * 4
    target = centres[labels] + torch.randn(n, d, generator=g)
    imagined = target + 0.5 * torch.randn(n, d, generator=g)
    return imagined, target, labels


def test_tsne_projection_png(tmp_path):
    imagined, target, labels = _embeddings()
    names = ["ang", "hap", "neu", "sad"]
    out = plot_embedding_projection(tmp_path / "tsne.png", imagined, target, labels, names, seed=0)
    _assert_png(tmp_path / "tsne.png")
    assert out["imagined"].shape == (40, 2) and out["target"].shape == (40, 2)
    assert np.all(np.isfinite(out["imagined"]))
    # Same seed -> same projection.
    again = plot_embedding_projection(tmp_path / "tsne2.png", imagined, target, labels, names, seed=0)
    np.testing.assert_allclose(again["imagined"], out["imagined"])


def test_projection_subsamples_and_validates(tmp_path):
    imagined, target, labels = _embeddings(n=100)
    names = ["ang", "hap", "neu", "sad"]
    out = plot_embedding_projection(tmp_path / "pca.png", imagined, target, labels, names, method="pca", max_points=50)
    _assert_png(tmp_path / "pca.png")
    assert out["index"].shape == (25,) and len(set(out["index"].tolist())) == 25
    assert np.all(np.diff(out["index"]) > 0)
    # Tiny input (t-SNE undefined) falls back to PCA instead of failing.
    out = plot_embedding_projection(tmp_path / "tiny.png", imagined[:2], target[:2], labels[:2], names)
    assert out["target"].shape == (2, 2)
    with pytest.raises(ValueError, match="same shape"):
        plot_embedding_projection(tmp_path / "x.png", imagined, target[:10], labels, names)
    with pytest.raises(ValueError, match="class_names"):
        plot_embedding_projection(tmp_path / "x.png", imagined, target, labels, names[:2])
    with pytest.raises(ValueError, match="method"):
        plot_embedding_projection(tmp_path / "x.png", imagined, target, labels, names, method="umap")
    assert not (tmp_path / "x.png").exists()


def test_report_md(tmp_path):
    out_dir = tmp_path / "run"
    fig = plot_ua_per_condition(out_dir / "figs" / "ua.png", _results())
    path = write_report_md(
        out_dir / "report.md",
        title="MMIN on IEMOCAP (toy)",
        results=_results(),
        seeds=[0, 1, 2],
        config={"lr": 2e-4, "epochs": [30, 30]},
        hypothesis_text="Imagination beats zero-filling.",
        figures={"UA per condition": fig},
        extra_sections={"Timings": "train 12 s"},
    )
    text = path.read_text()
    assert text.startswith("# MMIN on IEMOCAP (toy)\n")
    assert "## Hypothesis\n\nImagination beats zero-filling." in text
    assert markdown_table(_results()) in text
    assert "### Macro-F1" in text and markdown_table(_results(), ("F1",)) in text
    assert "![UA per condition](figs/ua.png)" in text  # relative to the report
    assert "## Timings\n\ntrain 12 s" in text
    assert "## Seeds\n\n0, 1, 2" in text
    assert '"lr": 0.0002' in text and text.index("## Seeds") < text.index("## Configuration")
    assert _files(out_dir) == ["figs", "report.md"]


def test_recovery_pictures(tmp_path):
    import numpy as np

    from mmer_ext import report

    rng = np.random.default_rng(0)
    real = rng.normal(size=(4, 8, 10))
    path = report.plot_recovery_heatmaps(tmp_path / "h.png", real, {"ridge": real * 0.5, "diffused": real + 1},
                                         rows=3, modality="V")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="one shape"):
        report.plot_recovery_heatmaps(tmp_path / "bad.png", real, {"ridge": real[:, :4]})
    frames = real.transpose(0, 2, 1).reshape(-1, 8)
    path = report.plot_recovery_projection(tmp_path / "p.png", {"real": frames, "ridge": frames * 0.3})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="N, C"):
        report.plot_recovery_projection(tmp_path / "bad.png", {"real": real})


def test_confusion_grid_figure(tmp_path):
    from mmer_ext.report import plot_confusion_matrices

    counts = {"{a}": [[3, 1], [0, 4]], "{a,v,l}": [[4, 0], [1, 3]], "overall": [[7, 1], [1, 7]]}
    path = plot_confusion_matrices(tmp_path / "cm.png", counts, ["neu", "ang"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="none of the conditions"):
        plot_confusion_matrices(tmp_path / "x.png", {"overall": [[1]]}, ["a"])
    with pytest.raises(ValueError, match="shape"):
        plot_confusion_matrices(tmp_path / "x.png", {"{a}": [[1, 0], [0, 1]]}, ["a", "b", "c"])


def test_mean_std_tables_and_the_spread_figure(tmp_path):
    from mmer_ext.report import format_mean_std_table, markdown_mean_std_table, mean_std_rows, plot_run_spread

    mean = {"{a}": {"WA": 0.5, "UA": 0.25}, "average": {"WA": 0.5, "UA": 0.25}}
    std = {"{a}": {"WA": 0.01, "UA": float("nan")}, "average": {"WA": 0.02, "UA": 0.03}}
    rows = mean_std_rows({"m": (mean, std)}, metrics=("WA", "UA"))
    assert rows[1][:3] == ["m", "WA", "50.00 ± 1.00"] and rows[2][2] == "25.00"  # a single run has no std
    assert rows[1][rows[0].index("{v}")] == "–" and rows[1][rows[0].index("average")] == "50.00 ± 2.00"
    assert "50.00 ± 1.00" in markdown_mean_std_table({"m": (mean, std)}) and "|" in format_mean_std_table(
        {"m": (mean, std)})
    reg_mean = {"MR=0.0": {"Acc2_non0": 0.7, "MAE": 0.9}, "MR=0.5": {"Acc2_non0": 0.6, "MAE": 1.1}}
    reg_std = {"MR=0.0": {"Acc2_non0": 0.01, "MAE": 0.05}, "MR=0.5": {"Acc2_non0": 0.02, "MAE": 0.1}}
    rows = mean_std_rows({"imder": (reg_mean, reg_std)}, metrics=("Acc2_non0", "MAE"), regression=True)
    assert rows == [["model", "MR", "Acc2_non0", "MAE"], ["imder", "MR=0.0", "70.00 ± 1.00", "0.90 ± 0.05"],
                    ["imder", "MR=0.5", "60.00 ± 2.00", "1.10 ± 0.10"]]
    runs = {"fold 1": {"{a}": {"UA": 0.4}, "{a,v,l}": {"UA": 0.6}}, "fold 2": {"{a}": {"UA": 0.5}}}
    assert plot_run_spread(tmp_path / "s.png", runs).read_bytes()[:4] == b"\x89PNG"
    assert plot_run_spread(tmp_path / "r.png", {"seed 0": reg_mean, "seed 1": reg_mean},
                           metric="MAE").read_bytes()[:4] == b"\x89PNG"
