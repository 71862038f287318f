"""Paper-style outputs of an experiment: result tables, figures, a JSON record and a markdown report.

The layout follows the MMIN paper's main table: one row per model, columns for the six missing-modality
conditions ({a}, {v}, {l}, {a,v}, {a,l}, {v,l}), their average, then the full-modality condition {a,v,l}, each
with WA and UA in percent. ``results`` everywhere in this module is the nested mapping

    {model_name: {condition_label_or_"average": {"WA": 0.71, "UA": 0.69, ...}}}

with metrics as fractions in [0, 1] (what :func:`mmer_ext.metrics.condition_metrics` returns per model). A cell that
is missing or NaN is kept as NaN in :func:`results_table` and printed as "–", so a partial run still produces a
table instead of an exception.

Why the care about files: experiments run for hours and are often interrupted or run concurrently; every writer here
goes through :func:`atomic_open` (temporary file in the same directory, flush + fsync, ``os.replace``), so a reader
sees either the previous complete file or the new complete one, never a truncated one, and a failed write leaves the
previous file untouched.

Figures use matplotlib's object-oriented API with an explicit Agg canvas (``matplotlib.figure.Figure``), never
``pyplot``: this needs no display, does not change the process-wide backend of a user who imported us from a
notebook, and leaves no figures registered in a global figure manager to leak memory across many plots.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmer_ext._atomic import atomic_open, atomic_write_bytes, atomic_write_text
from mmer_ext.data.protocols import CONDITION_LABELS
from mmer_ext.metrics import NUM_MISSING_CONDITIONS

__all__ = [
    "MISSING_CELL",
    "TABLE_CONDITIONS",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "format_mean_std_table",
    "format_missing_rate_table",
    "format_results",
    "format_table",
    "markdown_mean_std_table",
    "markdown_missing_rate_table",
    "missing_rate_table",
    "markdown_table",
    "plot_confusion_matrices",
    "plot_embedding_projection",
    "plot_missing_rate_curve",
    "plot_run_spread",
    "plot_seed_spread",
    "plot_training_curves",
    "plot_ua_per_condition",
    "results_table",
    "table_columns",
    "to_jsonable",
    "write_missing_rate_csv",
    "write_report_md",
    "write_results_json",
    "write_table_csv",
]

#: Column conditions in the MMIN paper's order: six missing conditions, their average, then full modalities.
TABLE_CONDITIONS: tuple[str, ...] = (
    tuple(CONDITION_LABELS[:NUM_MISSING_CONDITIONS]) + ("average",) + tuple(CONDITION_LABELS[NUM_MISSING_CONDITIONS:])
)

#: How a missing (NaN) cell is printed in console and markdown tables (an en dash, as in the papers).
MISSING_CELL = "–"

PathLike = str | os.PathLike




# --------------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------------


def _metric_value(cond_metrics: Mapping[str, Any] | None, metric: str) -> float:
    if not cond_metrics:
        return math.nan
    value = cond_metrics.get(metric)
    if value is None:
        return math.nan
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metric {metric!r} must be a number, got {value!r}") from None
    return value


def _model_cells(model_results: Mapping[str, Any], metric: str) -> dict[str, float]:
    """Fractions per table condition for one model; the average is derived from the six if it is absent."""
    cells = {cond: _metric_value(model_results.get(cond), metric) for cond in TABLE_CONDITIONS}
    six = [cells[c] for c in TABLE_CONDITIONS[:NUM_MISSING_CONDITIONS]]
    if "average" not in model_results and not any(math.isnan(v) for v in six):
        # Runs that only stored per-condition numbers still get the paper's average column (mean of the six).
        cells["average"] = float(np.mean(six))
    return cells


def _check_results(results: Mapping[str, Mapping[str, Any]]) -> None:
    if not isinstance(results, Mapping):
        raise TypeError(f"results must be a mapping {{model: {{condition: {{metric: value}}}}}}, got {type(results)}")
    for model, per_cond in results.items():
        if not isinstance(per_cond, Mapping):
            raise TypeError(f"results[{model!r}] must be a mapping {{condition: {{metric: value}}}}")


def table_columns(metrics: Sequence[str] = ("WA", "UA")) -> list[str]:
    """Header of :func:`results_table`: ``["model", "{a} WA", "{a} UA", ..., "{a,v,l} UA"]``."""
    return ["model"] + [f"{cond} {m}" for cond in TABLE_CONDITIONS for m in metrics]


def results_table(results: Mapping[str, Mapping[str, Any]], metrics: Sequence[str] = ("WA", "UA")) -> list[list]:
    """The paper's table as rows of values.

    Parameters
    ----------
    results : mapping
        ``{model: {condition_label_or_"average": {metric: fraction}}}``. Extra keys (e.g. ``"overall"``) are
        ignored. If a model has no ``"average"`` entry but has all six missing conditions, the average column is
        computed as their mean.
    metrics : sequence of str
        Metrics shown under each condition, in order.

    Returns
    -------
    list of list
        Row 0 is the header (:func:`table_columns`); then one row per model, in ``results`` order:
        ``[model_name, value, ...]`` with values in percent rounded to 2 decimals, NaN where a cell is missing.
        Columns: {a}, {v}, {l}, {a,v}, {a,l}, {v,l}, average, {a,v,l}, each with every metric of ``metrics``.
    """
    _check_results(results)
    rows: list[list] = [table_columns(metrics)]
    for model, per_cond in results.items():
        per_metric = {m: _model_cells(per_cond, m) for m in metrics}
        row: list = [str(model)]
        for cond in TABLE_CONDITIONS:
            for m in metrics:
                v = per_metric[m][cond]
                row.append(math.nan if math.isnan(v) else round(100.0 * v, 2))
        rows.append(row)
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING_CELL
    return f"{float(value):.2f}"


def format_table(results: Mapping[str, Mapping[str, Any]], metrics: Sequence[str] = ("WA", "UA")) -> str:
    """A fixed-width console table with a two-line header (condition, then metric), as laid out in the papers."""
    rows = results_table(results, metrics)
    body = [[_fmt(v) for v in row] for row in rows[1:]]
    name_w = max([len("model")] + [len(r[0]) for r in body])
    cell_w = max([6] + [len(m) for m in metrics] + [len(c) for r in body for c in r[1:]])
    k = len(metrics)
    # A condition's cells are joined by single spaces; widen them if the condition label is longer than that.
    label_w = max(len(c) for c in TABLE_CONDITIONS)
    cell_w = max(cell_w, -(-(label_w - (k - 1)) // k))
    group_w = k * cell_w + (k - 1)

    line1 = " " * name_w + " | " + " | ".join(c.center(group_w) for c in TABLE_CONDITIONS)
    line2 = "model".ljust(name_w) + " | " + " | ".join(
        " ".join(m.rjust(cell_w) for m in metrics) for _ in TABLE_CONDITIONS
    )
    sep = "-" * len(line2)
    out = [line1.rstrip(), line2, sep]
    for r in body:
        cells = r[1:]
        groups = [" ".join(c.rjust(cell_w) for c in cells[i * k : (i + 1) * k]) for i in range(len(TABLE_CONDITIONS))]
        out.append(r[0].ljust(name_w) + " | " + " | ".join(groups))
    return "\n".join(out) + "\n"


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def markdown_table(results: Mapping[str, Mapping[str, Any]], metrics: Sequence[str] = ("WA", "UA")) -> str:
    """The table as GitHub markdown (one header row, ``"{a} WA"``-style column names, values in percent)."""
    rows = results_table(results, metrics)
    header = ["Model"] + rows[0][1:]
    lines = [
        "| " + " | ".join(_md_escape(h) for h in header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for row in rows[1:]:
        lines.append("| " + " | ".join([_md_escape(row[0])] + [_fmt(v) for v in row[1:]]) + " |")
    return "\n".join(lines) + "\n"


def write_table_csv(
    path: PathLike, results: Mapping[str, Mapping[str, Any]], metrics: Sequence[str] = ("WA", "UA")
) -> Path:
    """Write :func:`results_table` as CSV (atomically). Missing cells are empty fields (read back as NaN by pandas)."""
    rows = results_table(results, metrics)
    with atomic_open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(rows[0])
        for row in rows[1:]:
            writer.writerow([row[0]] + ["" if math.isnan(v) else f"{v:.2f}" for v in row[1:]])
    return Path(path)


# ----------------------------------------------------------------------------------------- IMDer: missing-rate sweep
#: Columns of the missing-rate table: IMDer reports Acc-2 / F1 on the non-zero labels, Acc-7 and MAE; we add Corr and
#: the recovery error. Fractions are shown in percent; MAE, Corr and the recovery MSE / cosine as they are.
MISSING_RATE_METRICS: tuple[str, ...] = ("Acc2_non0", "F1_non0", "Acc7", "MAE", "Corr", "recovery_MSE")
_AS_IS = {"MAE", "Corr", "recovery_MSE", "recovery_cosine"}


def _is_missing_rate_results(metrics: Mapping[str, Any]) -> bool:
    return any(str(k).startswith("MR=") for k in metrics)


def missing_rate_table(results: Mapping[str, Mapping[str, Any]],
                       metrics: Sequence[str] = MISSING_RATE_METRICS) -> list[list]:
    """One row per (model, missing rate): ``[model, "MR=0.3", value, ...]``; accuracies and F1 in percent, other
    metrics as they are, NaN where a value is absent (a rate without recovery has no recovery error)."""
    _check_results(results)
    rows: list[list] = [["model", "MR", *metrics]]
    for model, per_rate in results.items():
        for key in sorted(k for k in per_rate if str(k).startswith("MR=")):
            row: list = [str(model), key]
            for m in metrics:
                v = _metric_value(per_rate[key], m)
                row.append(v if math.isnan(v) or m in _AS_IS else round(100.0 * v, 2))
            rows.append(row)
    return rows


def _fmt_cell(metric: str, value: Any) -> str:
    if metric in _AS_IS and isinstance(value, float) and not math.isnan(value):
        return f"{value:.4f}"
    return _fmt(value)


def format_missing_rate_table(results: Mapping[str, Mapping[str, Any]],
                              metrics: Sequence[str] = MISSING_RATE_METRICS) -> str:
    rows = missing_rate_table(results, metrics)
    body = [[r[0], r[1]] + [_fmt_cell(m, v) for m, v in zip(metrics, r[2:])] for r in rows[1:]]
    widths = [max(len(str(rows[0][i])), *(len(r[i]) for r in body)) if body else len(str(rows[0][i]))
              for i in range(len(rows[0]))]
    line = lambda cells: " | ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w)  # noqa: E731
                                    for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(rows[0]), "-" * len(line(rows[0]))] + [line(r) for r in body]
    return "\n".join(out) + "\n"


def markdown_missing_rate_table(results: Mapping[str, Mapping[str, Any]],
                                metrics: Sequence[str] = MISSING_RATE_METRICS) -> str:
    rows = missing_rate_table(results, metrics)
    lines = ["| " + " | ".join(_md_escape(h) for h in rows[0]) + " |",
             "|" + "|".join([":---", ":---"] + ["---:"] * len(metrics)) + "|"]
    for r in rows[1:]:
        lines.append("| " + " | ".join([_md_escape(r[0]), r[1]] + [_fmt_cell(m, v) for m, v in zip(metrics, r[2:])])
                     + " |")
    return "\n".join(lines) + "\n"


def write_missing_rate_csv(path: PathLike, results: Mapping[str, Mapping[str, Any]],
                           metrics: Sequence[str] = MISSING_RATE_METRICS) -> Path:
    """Write :func:`missing_rate_table` as CSV (atomically); absent values are empty fields."""
    rows = missing_rate_table(results, metrics)
    with atomic_open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(rows[0])
        for row in rows[1:]:
            writer.writerow(row[:2] + ["" if math.isnan(v) else v for v in row[2:]])
    return Path(path)


def format_results(model: str, metrics: Mapping[str, Any]) -> str:
    """The console table of one model's test metrics: the missing-rate sweep for IMDer, the six conditions else."""
    if _is_missing_rate_results(metrics):
        return format_missing_rate_table({model: metrics})
    return format_table({model: metrics})


# ------------------------------------------------------------------------------------ mean ± std over folds and seeds
def _pm(mean: float, std: float, scale: float) -> str:
    if math.isnan(mean):
        return MISSING_CELL
    if math.isnan(std):
        return f"{scale * mean:.2f}"
    return f"{scale * mean:.2f} ± {scale * std:.2f}"


def mean_std_rows(results: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]],
                  metrics: Sequence[str] = ("WA", "UA", "F1"), *, regression: bool = False) -> list[list[str]]:
    """Cells ``"mean ± std"`` (percent; MAE, Corr and the recovery metrics as they are). ``results``:
    ``{model: (mean, std)}``, each in the per-condition layout of :func:`results_table` (or the missing-rate layout
    with ``regression``). Classification: one row per (model, metric), the table's conditions as columns;
    regression: one row per (model, missing rate), ``metrics`` (default: :data:`MISSING_RATE_METRICS`) as columns."""
    _check_results({m: mean for m, (mean, _) in results.items()})
    if regression:
        metrics = MISSING_RATE_METRICS if tuple(metrics) == ("WA", "UA", "F1") else tuple(metrics)
        rows = [["model", "MR", *metrics]]
        for model, (mean, std) in results.items():
            for key in sorted(k for k in mean if str(k).startswith("MR=")):
                rows.append([str(model), key] + [
                    _pm(_metric_value(mean[key], m), _metric_value(std.get(key), m), 1.0 if m in _AS_IS else 100.0)
                    for m in metrics])
        return rows
    rows = [["model", "metric", *TABLE_CONDITIONS]]
    for model, (mean, std) in results.items():
        for m in metrics:
            mc, sc = _model_cells(mean, m), _model_cells(std, m)
            if all(math.isnan(v) for v in mc.values()):
                continue
            rows.append([str(model), m] + [_pm(mc[c], sc[c], 100.0) for c in TABLE_CONDITIONS])
    return rows


def markdown_mean_std_table(results: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]],
                            metrics: Sequence[str] = ("WA", "UA", "F1"), *, regression: bool = False) -> str:
    """:func:`mean_std_rows` as GitHub markdown."""
    rows = mean_std_rows(results, metrics, regression=regression)
    lines = ["| " + " | ".join(_md_escape(h) for h in rows[0]) + " |",
             "|" + "|".join([":---", ":---"] + ["---:"] * (len(rows[0]) - 2)) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in rows[1:]]
    return "\n".join(lines) + "\n"


def format_mean_std_table(results: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]],
                          metrics: Sequence[str] = ("WA", "UA", "F1"), *, regression: bool = False) -> str:
    """:func:`mean_std_rows` as a fixed-width console table."""
    rows = mean_std_rows(results, metrics, regression=regression)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: " | ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(rows[0]), "-" * len(fmt(rows[0]))] + [fmt(r) for r in rows[1:]]) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------------------------


def to_jsonable(obj: Any, _where: str = "payload") -> Any:
    """Convert ``obj`` into plain JSON data (dict/list/str/int/float/bool/None).

    Handles numpy scalars and arrays, torch tensors, paths, dataclasses (e.g. training recipes), OmegaConf configs,
    tuples and sets, and classes or functions (written as their ``module.qualname``). Non-finite floats become
    ``None`` because JSON has no NaN (Python would write the non-standard ``NaN`` token, which strict parsers
    reject). Anything else raises ``TypeError`` naming where in the payload it was found.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, bool):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "detach") and hasattr(obj, "cpu") and hasattr(obj, "tolist"):  # torch.Tensor
        return to_jsonable(obj.detach().cpu().tolist(), _where)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), _where)
    if isinstance(obj, type) or (callable(obj) and hasattr(obj, "__qualname__")):
        return f"{getattr(obj, '__module__', '?')}.{obj.__qualname__}"
    if dataclasses.is_dataclass(obj):
        return {f.name: to_jsonable(getattr(obj, f.name), f"{_where}.{f.name}") for f in dataclasses.fields(obj)}
    try:  # OmegaConf is optional; configs may be DictConfig/ListConfig
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return to_jsonable(OmegaConf.to_container(obj, resolve=True), _where)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, f"{_where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{_where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return [to_jsonable(v, _where) for v in sorted(obj, key=repr)]
    raise TypeError(f"{_where}: cannot convert {type(obj).__name__} to JSON")


def _environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
    }
    for mod in ("torch", "sklearn"):
        with contextlib.suppress(Exception):
            env[mod] = __import__(mod).__version__
    with contextlib.suppress(Exception):
        from mmer_ext import __version__

        env["mmer_ext"] = __version__
    return env


def write_results_json(
    path: PathLike,
    payload: Mapping[str, Any],
    *,
    seeds: Sequence[int] | None = None,
    config: Any = None,
    timings: Mapping[str, float] | None = None,
) -> Path:
    """Write ``payload`` plus a ``"meta"`` record as indented JSON (atomically).

    The written object is ``payload``'s keys followed by ``"meta"``: ``{"created_utc", "environment", "seeds",
    "config", "timings"}`` (the last three only when given). If ``payload`` already has a ``"meta"`` mapping, its
    keys win over the generated ones. Conversion follows :func:`to_jsonable` (NaN -> null); it runs completely
    before the file is opened, and an unconvertible object raises ``TypeError`` and leaves ``path`` untouched.
    """
    if not isinstance(payload, Mapping):
        raise TypeError(f"payload must be a mapping, got {type(payload).__name__}")
    meta: dict[str, Any] = {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": _environment(),
    }
    if seeds is not None:
        meta["seeds"] = seeds
    if config is not None:
        meta["config"] = config
    if timings is not None:
        meta["timings"] = timings
    doc = dict(payload)
    if isinstance(doc.get("meta"), Mapping):
        meta.update(doc["meta"])
    doc["meta"] = meta
    data = to_jsonable(doc)
    with atomic_open(path, "w") as fh:
        json.dump(data, fh, indent=2, allow_nan=False)
        fh.write("\n")
    return Path(path)


# --------------------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------------------


def _new_figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: PathLike, dpi: int) -> Path:
    try:
        with atomic_open(path, "wb") as fh:
            fig.savefig(fh, format="png", dpi=dpi)
    finally:
        fig.clear()  # not registered with pyplot, so clearing drops the artists and their memory
    return Path(path)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_ua_per_condition(
    path: PathLike,
    results: Mapping[str, Mapping[str, Any]],
    metric: str = "UA",
    *,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Grouped bar chart of one metric (default UA, in percent) per table condition, one bar per model (PNG).

    Missing cells are not drawn; a "–" marks their place so that an absent bar is not mistaken for a zero score.
    Works for any number of models (bars get narrower).
    """
    rows = results_table(results, (metric,))
    models = [r[0] for r in rows[1:]]
    values = np.array([r[1:] for r in rows[1:]], dtype=float).reshape(len(models), len(TABLE_CONDITIONS))
    n = max(len(models), 1)
    fig = _new_figure((max(7.0, 1.0 + 0.35 * n * len(TABLE_CONDITIONS)), 4.2))
    ax = fig.add_subplot()
    x = np.arange(len(TABLE_CONDITIONS), dtype=float)
    width = 0.8 / n
    for i, (model, color) in enumerate(zip(models, _colors(n))):
        xs = x - 0.4 + width * (i + 0.5)
        ok = ~np.isnan(values[i])
        ax.bar(xs[ok], values[i][ok], width=width, color=color, label=model)
        for xm in xs[~ok]:
            ax.text(xm, 0.5, MISSING_CELL, ha="center", va="bottom", fontsize=11, fontweight="bold", color=color)
    finite = values[~np.isnan(values)]
    top = float(finite.max()) if finite.size else 100.0
    ax.set_ylim(0.0, min(100.0, top * 1.12 + 1.0) if top <= 100.0 else top * 1.12)
    ax.set_xticks(x, TABLE_CONDITIONS)
    ax.axvline(NUM_MISSING_CONDITIONS - 0.5, color="0.6", lw=0.8, ls="--")  # six conditions | average, full
    ax.set_ylabel(f"{metric} (%)")
    ax.set_xlabel("available modalities")
    ax.set_title(title or f"{metric} per missing-modality condition")
    ax.grid(axis="y", alpha=0.3)
    if models:
        from matplotlib.patches import Patch

        # Explicit handles: a model whose bars are all missing still gets its own colour in the legend.
        handles = [Patch(color=c, label=m) for m, c in zip(models, _colors(n))]
        fig.legend(handles=handles, fontsize=8, loc="outside right upper", frameon=False)
    return _save_png(fig, path, dpi)


def plot_run_spread(
    path: PathLike,
    runs: Mapping[str, Mapping[str, Any]],
    metric: str = "UA",
    *,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """The spread of repeated runs (folds, seeds) per condition: a box per condition with every run drawn as a
    point beside it (PNG). ``runs``: ``{run name: metrics}`` in the per-condition layout (or the missing-rate one,
    then one box per missing rate). Percent except for MAE / Corr / recovery metrics."""
    _check_results(runs)
    if not runs:
        raise ValueError("no runs to plot")
    first = next(iter(runs.values()))
    if _is_missing_rate_results(first):
        keys = sorted(k for k in first if str(k).startswith("MR="))
    else:
        keys = list(TABLE_CONDITIONS)
    scale = 1.0 if metric in _AS_IS else 100.0
    columns = []
    for key in keys:
        cells = [(_model_cells(m, metric)[key] if key in TABLE_CONDITIONS else _metric_value(m.get(key), metric))
                 for m in runs.values()]
        columns.append(np.array([scale * v for v in cells if not math.isnan(v)], dtype=np.float64))
    fig = _new_figure((max(6.0, 0.9 * len(keys) + 1.5), 4.2))
    ax = fig.add_subplot()
    x = np.arange(len(keys), dtype=float)
    shown = [i for i, c in enumerate(columns) if c.size]
    if shown:
        ax.boxplot([columns[i] for i in shown], positions=x[shown], widths=0.5, showfliers=False,
                   medianprops={"color": "C1"})
    rng = np.random.default_rng(0)  # the jitter only separates the points; fixed so the figure is reproducible
    for i in shown:
        ax.scatter(x[i] + rng.uniform(-0.12, 0.12, columns[i].size), columns[i], s=14, color="C0", alpha=0.8,
                   zorder=3)
    ax.set_xticks(x, keys)
    if keys == list(TABLE_CONDITIONS):
        ax.axvline(NUM_MISSING_CONDITIONS - 0.5, color="0.6", lw=0.8, ls="--")
        ax.set_xlabel("available modalities")
    else:
        ax.set_xlabel("missing rate")
    ax.set_ylabel(metric + ("" if scale == 1.0 else " (%)"))
    ax.set_title(title or f"{metric} over {len(runs)} runs")
    ax.grid(axis="y", alpha=0.3)
    return _save_png(fig, path, dpi)


def plot_seed_spread(
    path: PathLike,
    panels: Mapping[str, Mapping[str, Sequence[float]]],
    metric: str = "UA",
    *,
    dpi: int = 120,
) -> Path:
    """One panel per protocol: each model's per-seed values (points, fractions shown in percent) over a bar at their
    mean, so the spread over seeds is read beside the difference between models (PNG). ``panels``:
    ``{panel title: {model: [value of each seed]}}``."""
    if not panels:
        raise ValueError("no panels to plot")
    fig = _new_figure((max(6.0, 3.2 * len(panels)), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    rng = np.random.default_rng(0)  # jitter only; fixed so the figure is reproducible
    for ax, (title, per_model) in zip(axes, panels.items()):
        models = list(per_model)
        colors = _colors(len(models))
        for i, model in enumerate(models):
            values = 100.0 * np.asarray(per_model[model], dtype=np.float64)
            ax.bar(i, values.mean(), width=0.6, color=colors[i], alpha=0.35)
            ax.scatter(i + rng.uniform(-0.12, 0.12, values.size), values, s=18, color=colors[i], zorder=3)
        finite = np.concatenate([100.0 * np.asarray(v, dtype=np.float64) for v in per_model.values()])
        lo, hi = float(finite.min()), float(finite.max())
        pad = max(1.0, 0.15 * (hi - lo))
        ax.set_ylim(lo - 3 * pad, hi + pad)
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(axis="y", alpha=0.3)
    return _save_png(fig, path, dpi)


#: Panels of :func:`plot_confusion_matrices`, in the tables' order (the average has no matrix of its own).
CONFUSION_PANELS: tuple[str, ...] = tuple(c for c in TABLE_CONDITIONS if c != "average")


def normalise_confusion(counts: Any) -> np.ndarray:
    """Rows divided by their sums (each row: how the items of one true class were predicted; the diagonal is the
    per-class recall). A class with no items keeps a row of NaN rather than a row that reads as all-wrong."""
    m = np.asarray(counts, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"a confusion matrix must be square, got shape {m.shape}")
    rows = m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, m / np.where(rows > 0, rows, 1.0), np.nan)


def plot_confusion_matrices(
    path: PathLike,
    confusion: Mapping[str, Any],
    class_names: Sequence[str],
    *,
    title: str | None = None,
    dpi: int = 110,
) -> Path:
    """A grid of confusion matrices, one per condition ({a} ... {v,l}, then {a,v,l}), normalised by true class
    (PNG). ``confusion``: ``{condition label: counts [true][pred]}`` as in the evaluation JSON's ``"confusion"``;
    conditions it lacks are left out. Each cell shows the fraction of the row's items; the panel title gives the
    number of items."""
    panels = [c for c in CONFUSION_PANELS if c in confusion]
    if not panels:
        raise ValueError(f"confusion holds none of the conditions {list(CONFUSION_PANELS)}")
    k = len(class_names)
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    size = 1.1 + 0.45 * k
    fig = _new_figure((cols * size + 0.8, rows * size + 0.5))
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for i, ax in enumerate(axes.flat):
        if i >= len(panels):
            ax.set_axis_off()
            continue
        counts = np.asarray(confusion[panels[i]])
        if counts.shape != (k, k):
            raise ValueError(f"confusion[{panels[i]!r}] has shape {counts.shape}, {len(class_names)} class names")
        frac = normalise_confusion(counts)
        image = ax.imshow(frac, vmin=0.0, vmax=1.0, cmap="Blues")
        for r in range(k):
            for c in range(k):
                if np.isfinite(frac[r, c]):
                    ax.text(c, r, f"{frac[r, c]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if frac[r, c] > 0.6 else "black")
        ax.set_title(f"{panels[i]} (n={int(counts.sum())})", fontsize=9)
        ax.set_xticks(range(k), [str(n) for n in class_names], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(k), [str(n) for n in class_names] if i % cols == 0 else [], fontsize=7)
        if i % cols == 0:
            ax.set_ylabel("true", fontsize=8)
        if i // cols == rows - 1:
            ax.set_xlabel("predicted", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="fraction of the true class")
    fig.suptitle(title or "confusion per available-modality condition (rows: true class)", fontsize=10)
    return _save_png(fig, path, dpi)


def _as_2d(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or inf")
    return arr


def plot_embedding_projection(
    path: PathLike,
    imagined: Any,
    target: Any,
    labels: Any,
    class_names: Sequence[str],
    method: str = "tsne",
    seed: int = 0,
    *,
    max_points: int = 1500,
    title: str | None = None,
    dpi: int = 120,
) -> dict[str, np.ndarray]:
    """The MMIN paper's figure: a 2-D projection of imagined vs real joint embeddings (PNG).

    Parameters
    ----------
    path : str or PathLike
        PNG destination.
    imagined, target : array-like, shape [N, D]
        ``model.embeddings(batch)["imagined"]`` and ``["target"]`` of the same N utterances (row i of each belongs
        to utterance i).
    labels : array-like of int, shape [N]
        Emotion class of each utterance; the colour of its two points.
    class_names : sequence of str
        Legend names, indexed by class id.
    method : {"tsne", "pca"}
        t-SNE as in the paper (``sklearn.manifold.TSNE``, PCA init, ``random_state=seed``), or PCA (fast, linear).
    seed : int
        Fixes both the subsample and the projection, so the figure is reproducible.
    max_points : int
        Cap on plotted points (imagined + real). t-SNE is quadratic-ish; above the cap, ``max_points // 2``
        utterances are drawn at random (without replacement) and both their embeddings kept, so the pairs stay
        comparable.

    Returns
    -------
    dict
        ``{"index": chosen utterance indices [n], "imagined": [n, 2], "target": [n, 2]}`` -- the plotted
        coordinates.

    Notes
    -----
    Both sets are projected jointly (one fit on their concatenation): projecting them separately would put them
    in unrelated coordinate systems and make the "imagined lands near real" comparison meaningless.
    """
    imagined = _as_2d(imagined, "imagined")
    target = _as_2d(target, "target")
    if imagined.shape != target.shape:
        raise ValueError(f"imagined and target must have the same shape, got {imagined.shape} vs {target.shape}")
    from mmer_ext.metrics import _as_label_array

    labels = _as_label_array(labels, "labels")
    n_all = imagined.shape[0]
    if labels.shape[0] != n_all:
        raise ValueError(f"labels has {labels.shape[0]} entries for {n_all} embeddings")
    if n_all == 0:
        raise ValueError("no embeddings to plot")
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f"labels must be in [0, {len(class_names)}) to name them with class_names")
    if method not in ("tsne", "pca"):
        raise ValueError(f"method must be 'tsne' or 'pca', got {method!r}")
    if max_points < 2:
        raise ValueError("max_points must be at least 2")

    rng = np.random.default_rng(seed)
    n_keep = min(n_all, max_points // 2)
    index = np.sort(rng.choice(n_all, size=n_keep, replace=False)) if n_keep < n_all else np.arange(n_all)
    joint = np.concatenate([imagined[index], target[index]], axis=0)
    n_pts = joint.shape[0]

    if method == "tsne" and n_pts >= 5:
        from sklearn.manifold import TSNE

        # Perplexity must stay below the number of points; 30 is sklearn's default for larger sets.
        perplexity = float(min(30.0, max(1.0, (n_pts - 1) / 3.0)))
        proj = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(joint)
    else:
        # PCA on request, and for tiny sets where t-SNE is undefined.
        centred = joint - joint.mean(axis=0, keepdims=True)
        if n_pts >= 2 and joint.shape[1] >= 2:
            from sklearn.decomposition import PCA

            k = min(2, n_pts, joint.shape[1])
            proj = PCA(n_components=k, random_state=seed).fit_transform(centred)
        else:
            proj = centred[:, :1] if joint.shape[1] else np.zeros((n_pts, 1))
        if proj.shape[1] < 2:
            proj = np.concatenate([proj, np.zeros((n_pts, 2 - proj.shape[1]))], axis=1)
    proj = np.asarray(proj, dtype=np.float64)
    p_im, p_tg = proj[:n_keep], proj[n_keep:]
    lab = labels[index]

    from matplotlib.lines import Line2D

    fig = _new_figure((7.2, 5.6))
    ax = fig.add_subplot()
    colors = _colors(len(class_names))
    for c, name in enumerate(class_names):
        m = lab == c
        if not m.any():
            continue
        ax.scatter(p_tg[m, 0], p_tg[m, 1], s=26, marker="o", facecolors="none", edgecolors=colors[c], linewidths=0.9)
        ax.scatter(p_im[m, 0], p_im[m, 1], s=16, marker="x", color=colors[c], alpha=0.85, linewidths=0.9)
    handles = [
        Line2D([], [], ls="", marker="s", color=colors[c], label=str(name)) for c, name in enumerate(class_names)
    ]
    handles += [
        Line2D([], [], ls="", marker="o", markerfacecolor="none", color="0.3", label="real (target)"),
        Line2D([], [], ls="", marker="x", color="0.3", label="imagined"),
    ]
    fig.legend(handles=handles, fontsize=8, loc="outside right upper", frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    method_name = "t-SNE" if method == "tsne" else "PCA"
    ax.set_title(title or f"{method_name} of imagined vs real joint embeddings ({n_keep} utterances)")
    _save_png(fig, path, dpi)
    return {"index": index, "imagined": p_im, "target": p_tg}


def plot_training_curves(
    path: PathLike,
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    select: Mapping[str, tuple[str, str]] | None = None,
    *,
    dpi: int = 110,
) -> Path:
    """Per stage (a column each): the training losses (top) and the validation metrics (bottom) per epoch (PNG).

    ``histories``: ``{stage: [{"epoch", "train": {loss part: value}, "val": {metric: value}}, ...]}``, the trainer's
    per-epoch records. ``select``: ``{stage: (metric, "max" or "min")}``, the validation metric that selects the
    best epoch, drawn bold with its best epoch marked.
    """
    from matplotlib.ticker import MaxNLocator

    stages = [s for s, h in histories.items() if h]
    if not stages:
        raise ValueError("no stage has any epoch to plot")
    select = dict(select or {})
    fig = _new_figure((max(5.0, 4.2 * len(stages)), 6.0))
    axes = fig.subplots(2, len(stages), squeeze=False)
    for col, stage in enumerate(stages):
        records = histories[stage]
        epochs = [int(r["epoch"]) for r in records]
        selected, mode = select.get(stage, (None, "max"))
        for row, group in enumerate(("train", "val")):
            ax = axes[row][col]
            names = list(dict.fromkeys(k for r in records for k, v in (r.get(group) or {}).items()
                                       if isinstance(v, (int, float)) and not isinstance(v, bool)))
            for name in names:
                values = [float((r.get(group) or {}).get(name, math.nan)) for r in records]
                bold = (group == "train" and name == "loss") or (group == "val" and name == selected)
                ax.plot(epochs, values, marker="o" if len(epochs) < 30 else None, ms=3, lw=2.2 if bold else 1.0,
                        alpha=1.0 if bold else 0.7, label=name)
            if group == "val" and selected in names:
                values = np.array([float(r["val"].get(selected, math.nan)) for r in records])
                if np.isfinite(values).any():
                    best = int(np.nanargmin(values) if mode == "min" else np.nanargmax(values))
                    ax.axvline(epochs[best], color="0.5", ls="--", lw=0.8)
                    ax.annotate(f"best {selected} @ {epochs[best]}", (epochs[best], values[best]), fontsize=8,
                                textcoords="offset points", xytext=(4, 4))
            if group == "train" and names:
                # Loss parts can differ by orders of magnitude (a cycle loss beside a cross-entropy).
                finite = np.array([float(r["train"][n]) for r in records for n in names if n in r["train"]])
                finite = finite[np.isfinite(finite)]
                if finite.size and finite.min() > 0 and finite.max() / finite.min() > 100:
                    ax.set_yscale("log")
            ax.set_title(f"{stage}: {'training losses' if group == 'train' else 'validation'}", fontsize=10)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            if names:
                ax.legend(fontsize=7, frameon=False)
    return _save_png(fig, path, dpi)


def plot_missing_rate_curve(
    path: PathLike,
    results: Mapping[str, Mapping[str, Any]],
    metrics: Sequence[str] = ("Acc2_non0", "F1_non0", "Acc7"),
    *,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """IMDer's counterpart of :func:`plot_ua_per_condition`: each metric (percent) against the missing rate, one
    line per model and metric (PNG)."""
    rows = missing_rate_table(results, metrics)
    fig = _new_figure((7.0, 4.2))
    ax = fig.add_subplot()
    models = list(dict.fromkeys(r[0] for r in rows[1:]))
    for model in models:
        mine = [r for r in rows[1:] if r[0] == model]
        rates = [float(r[1].split("=", 1)[1]) for r in mine]
        for j, metric in enumerate(metrics):
            ax.plot(rates, [r[2 + j] for r in mine], marker="o", label=f"{model} {metric}" if len(models) > 1
                    else metric)
    ax.set_xlabel("missing rate MR")
    ax.set_ylabel("%")
    ax.set_title(title or "test metrics per missing rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return _save_png(fig, path, dpi)


# --------------------------------------------------------------------------------------------------------------------
# Markdown report
# --------------------------------------------------------------------------------------------------------------------


def _has_metric(results: Mapping[str, Mapping[str, Any]], metric: str) -> bool:
    return any(
        isinstance(v, Mapping) and v.get(metric) is not None for per in results.values() for v in per.values()
    )


def _items(x: Mapping[str, Any] | Sequence | None) -> list[tuple[str, Any]]:
    if x is None:
        return []
    if isinstance(x, Mapping):
        return [(str(k), v) for k, v in x.items()]
    out = []
    for item in x:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            out.append((str(item[0]), item[1]))
        else:
            out.append((Path(os.fspath(item)).stem, item))
    return out


def write_report_md(
    path: PathLike,
    *,
    title: str,
    results: Mapping[str, Mapping[str, Any]],
    seeds: Sequence[int] | None = None,
    config: Any = None,
    hypothesis_text: str | None = None,
    figures: Mapping[str, PathLike] | Sequence[PathLike | tuple[str, PathLike]] | None = None,
    extra_sections: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    metrics: Sequence[str] = ("WA", "UA"),
) -> Path:
    """Write ``report.md`` (atomically): hypothesis, result table(s), figures, extra sections, seeds, config.

    Parameters
    ----------
    path : str or PathLike
        Destination of the markdown file.
    title : str
        Level-1 heading.
    results : mapping
        As for :func:`results_table`. The main table shows ``metrics`` (WA/UA, the paper's); a macro-F1 table
        follows when the results carry ``"F1"``.
    seeds : sequence of int, optional
        Seeds of the runs aggregated in ``results``.
    config : any, optional
        The configuration used, rendered as JSON via :func:`to_jsonable`.
    hypothesis_text : str, optional
        What the experiment tests, shown first.
    figures : mapping caption -> path, or sequence of paths / (caption, path) pairs, optional
        Images to embed. They are linked by their path relative to the report's directory (posix separators), so
        the report keeps working when the whole output folder is moved or published. A relative figure path is
        read relative to the current directory if a file exists there, else relative to the report's directory.
    extra_sections : mapping heading -> markdown body, or sequence of such pairs, optional
        Added after the figures, in order.
    """
    path = Path(path)
    base = path.parent.resolve() if str(path.parent) else Path.cwd()
    parts = [f"# {title}\n"]
    if hypothesis_text:
        parts.append(f"## Hypothesis\n\n{hypothesis_text.strip()}\n")
    parts.append(
        "## Results\n\n"
        f"{' / '.join(metrics)} in percent per available-modality condition; `average` is the mean over the six "
        f"missing-modality conditions; `{MISSING_CELL}` marks a value that was not measured.\n\n"
        + markdown_table(results, metrics)
    )
    if "F1" not in metrics and _has_metric(results, "F1"):
        parts.append("### Macro-F1\n\n" + markdown_table(results, ("F1",)))
    figure_items = _items(figures)
    if figure_items:
        lines = ["## Figures\n"]
        for caption, fig_path in figure_items:
            p = Path(os.fspath(fig_path))
            p_abs = p if p.is_absolute() else (base / p if not p.exists() else p.resolve())
            rel = Path(os.path.relpath(p_abs, base)).as_posix()
            lines.append(f"![{caption}]({rel})\n\n*{caption}*\n")
        parts.append("\n".join(lines))
    for heading, body in _items(extra_sections):
        parts.append(f"## {heading}\n\n{str(body).strip()}\n")
    if seeds is not None:
        parts.append("## Seeds\n\n" + ", ".join(str(int(s)) for s in seeds) + "\n")
    if config is not None:
        parts.append("## Configuration\n\n```json\n" + json.dumps(to_jsonable(config, "config"), indent=2) + "\n```\n")
    text = "\n".join(parts)
    atomic_write_text(path, text)
    return path


def plot_recovery_heatmaps(path: PathLike, real: Any, recovered: Mapping[str, Any], *, rows: int = 3,
                           modality: str = "", dpi: int = 110) -> Path:
    """Real vs recovered features of a few sequences as heatmaps (channel x time), one row per sequence, one
    column per source: ``real`` ``[N, C, L]`` and each ``recovered[name]`` of the same shape (PNG). All panels
    share one colour scale (the real features' 1st-99th percentile), so a shrunk or blown-up recovery shows."""
    real = np.asarray(real, dtype=float)
    recs = {k: np.asarray(v, dtype=float) for k, v in recovered.items()}
    if real.ndim != 3 or any(v.shape != real.shape for v in recs.values()):
        raise ValueError(f"real and every recovery must be [N, C, L] of one shape, got {real.shape} and "
                         f"{[v.shape for v in recs.values()]}")
    n = min(rows, real.shape[0])
    if n < 1:
        raise ValueError("no sequences to plot")
    lo, hi = np.percentile(real[:n], [1, 99])
    cols = {"real": real, **recs}
    fig = _new_figure((2.6 * len(cols), 1.9 * n + 0.4))
    axes = fig.subplots(n, len(cols), squeeze=False)
    for i in range(n):
        for j, (name, arr) in enumerate(cols.items()):
            ax = axes[i][j]
            im = ax.imshow(arr[i], aspect="auto", cmap="coolwarm", vmin=lo, vmax=hi, interpolation="nearest")
            if i == 0:
                ax.set_title(name, fontsize=9)
            ax.set_xlabel("time step" if i == n - 1 else "", fontsize=8)
            ax.set_ylabel(f"seq {i}: channel" if j == 0 else "", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=axes, shrink=0.7)
    fig.suptitle(f"IMDer: real vs recovered {modality} features (test sequences)".replace("  ", " "), fontsize=10)
    return _save_png(fig, path, dpi)


def plot_recovery_projection(path: PathLike, sets: Mapping[str, Any], *, max_points: int = 800, seed: int = 0,
                             title: str = "IMDer: real, regressed and diffused features (PCA of the real ones)",
                             dpi: int = 110) -> Path:
    """A 2-D PCA projection of sets of feature vectors (``sets[name]`` ``[N_k, C]``, e.g. per-step frames of real,
    regressed and diffused features); the axes are the first two principal components of the *first* set, so
    every set is seen in the real data's coordinates (PNG)."""
    arrays = {k: np.asarray(v, dtype=float) for k, v in sets.items()}
    if not arrays or any(a.ndim != 2 for a in arrays.values()):
        raise ValueError("sets must map names to [N, C] arrays")
    rng = np.random.default_rng(seed)
    first = next(iter(arrays.values()))
    mean = first.mean(axis=0)
    _, _, vt = np.linalg.svd(first - mean, full_matrices=False)
    basis = vt[:2].T
    fig = _new_figure((5.2, 4.2))
    ax = fig.subplots()
    for (name, arr), color in zip(arrays.items(), _colors(len(arrays))):
        pick = rng.choice(arr.shape[0], size=min(max_points, arr.shape[0]), replace=False)
        xy = (arr[pick] - mean) @ basis
        ax.scatter(xy[:, 0], xy[:, 1], s=5, alpha=0.45, color=color, label=name)
    ax.set_xlabel("PC 1 of the real features")
    ax.set_ylabel("PC 2")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, markerscale=3)
    return _save_png(fig, path, dpi)
