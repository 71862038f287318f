"""Paper-style outputs of an experiment, one module per kind: ``tables`` (console, markdown, CSV), ``records`` (the
JSON record), ``figures`` (PNG pictures), ``markdown`` (the report page). Everything is importable from here.

The layout follows the MMIN paper's main table: one row per model, columns for the six missing-modality
conditions ({a}, {v}, {l}, {a,v}, {a,l}, {v,l}), their average, then the full-modality condition {a,v,l}, each
with WA and UA in percent. ``results`` everywhere in this module is the nested mapping

    {model_name: {condition_label_or_"average": {"WA": 0.71, "UA": 0.69, ...}}}

with metrics as fractions in [0, 1] (what :func:`mmer_ext.metrics.condition_metrics` returns per model). A cell that
is missing or NaN is kept as NaN in ``results_table`` and printed as "–", so a partial run still produces a
table instead of an exception.

Why the care about files: experiments run for hours and are often interrupted or run concurrently; every writer here
goes through ``atomic_open`` (temporary file in the same directory, flush + fsync, ``os.replace``), so a reader
sees either the previous complete file or the new complete one, never a truncated one, and a failed write leaves the
previous file untouched.

Figures use matplotlib's object-oriented API with an explicit Agg canvas (``matplotlib.figure.Figure``), never
``pyplot``: this needs no display, does not change the process-wide backend of a user who imported us from a
notebook, and leaves no figures registered in a global figure manager to leak memory across many plots.
"""

from __future__ import annotations

from mmer_ext._atomic import atomic_open, atomic_write_bytes, atomic_write_text
from mmer_ext.report import figures, markdown, records, tables
from mmer_ext.report.figures import (
    CONFUSION_PANELS,
    normalise_confusion,
    plot_confusion_matrices,
    plot_embedding_projection,
    plot_missing_rate_curve,
    plot_recovery_heatmaps,
    plot_recovery_projection,
    plot_run_spread,
    plot_seed_spread,
    plot_training_curves,
    plot_ua_per_condition,
)
from mmer_ext.report.markdown import (
    write_report_md,
)
from mmer_ext.report.records import (
    to_jsonable,
    write_results_json,
)
from mmer_ext.report.tables import (
    AS_IS_METRICS,
    MISSING_CELL,
    MISSING_RATE_METRICS,
    TABLE_CONDITIONS,
    check_results,
    format_mean_std_table,
    format_missing_rate_table,
    format_results,
    format_table,
    is_missing_rate_results,
    markdown_mean_std_table,
    markdown_missing_rate_table,
    markdown_table,
    mean_std_rows,
    metric_value,
    missing_rate_table,
    model_cells,
    results_table,
    table_columns,
    write_missing_rate_csv,
    write_table_csv,
)

__all__ = [
    "AS_IS_METRICS",
    "CONFUSION_PANELS",
    "MISSING_CELL",
    "MISSING_RATE_METRICS",
    "TABLE_CONDITIONS",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_results",
    "format_mean_std_table",
    "format_missing_rate_table",
    "format_results",
    "format_table",
    "is_missing_rate_results",
    "markdown_mean_std_table",
    "markdown_missing_rate_table",
    "markdown_table",
    "mean_std_rows",
    "metric_value",
    "missing_rate_table",
    "model_cells",
    "normalise_confusion",
    "plot_confusion_matrices",
    "plot_embedding_projection",
    "plot_missing_rate_curve",
    "plot_recovery_heatmaps",
    "plot_recovery_projection",
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
