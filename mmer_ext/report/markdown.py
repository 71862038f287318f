"""The markdown report of an experiment: its tables, figures and settings on one page."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


from mmer_ext._atomic import atomic_write_text
from mmer_ext.report.records import to_jsonable
from mmer_ext.report.tables import MISSING_CELL, markdown_table

PathLike = str | os.PathLike


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
