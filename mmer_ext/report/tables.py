"""Result tables of an experiment: console text, markdown and CSV, one row per model (the MMIN paper's layout:
six missing conditions, their average, then full modalities), IMDer's missing-rate tables and mean ± std tables
over runs. Metrics are fractions in [0, 1]; a missing or NaN cell prints as ``MISSING_CELL``."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmer_ext._atomic import atomic_open
from mmer_ext.data.protocols import CONDITION_LABELS
from mmer_ext.metrics import NUM_MISSING_CONDITIONS

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


def metric_value(cond_metrics: Mapping[str, Any] | None, metric: str) -> float:
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


def model_cells(model_results: Mapping[str, Any], metric: str) -> dict[str, float]:
    """Fractions per table condition for one model; the average is derived from the six if it is absent."""
    cells = {cond: metric_value(model_results.get(cond), metric) for cond in TABLE_CONDITIONS}
    six = [cells[c] for c in TABLE_CONDITIONS[:NUM_MISSING_CONDITIONS]]
    if "average" not in model_results and not any(math.isnan(v) for v in six):
        # Runs that only stored per-condition numbers still get the paper's average column (mean of the six).
        cells["average"] = float(np.mean(six))
    return cells


def check_results(results: Mapping[str, Mapping[str, Any]]) -> None:
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
    check_results(results)
    rows: list[list] = [table_columns(metrics)]
    for model, per_cond in results.items():
        per_metric = {m: model_cells(per_cond, m) for m in metrics}
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
AS_IS_METRICS = {"MAE", "Corr", "recovery_MSE", "recovery_cosine"}


def is_missing_rate_results(metrics: Mapping[str, Any]) -> bool:
    return any(str(k).startswith("MR=") for k in metrics)


def missing_rate_table(results: Mapping[str, Mapping[str, Any]],
                       metrics: Sequence[str] = MISSING_RATE_METRICS) -> list[list]:
    """One row per (model, missing rate): ``[model, "MR=0.3", value, ...]``; accuracies and F1 in percent, other
    metrics as they are, NaN where a value is absent (a rate without recovery has no recovery error)."""
    check_results(results)
    rows: list[list] = [["model", "MR", *metrics]]
    for model, per_rate in results.items():
        for key in sorted(k for k in per_rate if str(k).startswith("MR=")):
            row: list = [str(model), key]
            for m in metrics:
                v = metric_value(per_rate[key], m)
                row.append(v if math.isnan(v) or m in AS_IS_METRICS else round(100.0 * v, 2))
            rows.append(row)
    return rows


def _fmt_cell(metric: str, value: Any) -> str:
    if metric in AS_IS_METRICS and isinstance(value, float) and not math.isnan(value):
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
    if is_missing_rate_results(metrics):
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
    check_results({m: mean for m, (mean, _) in results.items()})
    if regression:
        metrics = MISSING_RATE_METRICS if tuple(metrics) == ("WA", "UA", "F1") else tuple(metrics)
        rows = [["model", "MR", *metrics]]
        for model, (mean, std) in results.items():
            for key in sorted(k for k in mean if str(k).startswith("MR=")):
                rows.append([str(model), key] + [
                    _pm(metric_value(mean[key], m), metric_value(std.get(key), m), 1.0 if m in AS_IS_METRICS else 100.0)
                    for m in metrics])
        return rows
    rows = [["model", "metric", *TABLE_CONDITIONS]]
    for model, (mean, std) in results.items():
        for m in metrics:
            mc, sc = model_cells(mean, m), model_cells(std, m)
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
