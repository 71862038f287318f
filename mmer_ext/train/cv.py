"""Cross-validation and seed repeats: ``mmer-ext train --folds all --seeds 3`` as one resumable command.

The papers report means over the speaker-independent folds (IEMOCAP 10, MSP-IMPROV 12) and over seeds. Each
(fold, seed) run is an ordinary :func:`~mmer_ext.train.fit` run in its own subdirectory of ``out_dir``
(``fold-03-seed-1``, ``fold-03`` or ``seed-1`` when only one of the two varies), so it is resumable exactly as a
single run is: a killed cross-validation, started again, skips the runs that finished (their ``test_metrics.json``
is read back) and resumes the interrupted one at the epoch it stopped.

Written into ``out_dir`` once every run has finished:

- ``cv_results.csv``: the paper's table, one row per run, then the ``mean`` and ``std`` rows (WA, UA, F1, WF1;
  IMDer: the missing-rate table);
- ``cv_results.md``: the table as mean ± std, then the per-run rows;
- ``cv_results.json``: every run's metrics, the mean, the std (sample standard deviation, ddof = 1, over the runs)
  and, for classification, the confusion matrices summed over the runs;
- ``cv_spread.png``: the spread of the runs per condition (box plot with every run as a point);
- ``cv_confusion_matrices.png``: the summed confusion matrices, normalised by true class.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mmer_ext.train.config import ConfigError, TrainConfig, config_to_dict, int_list, parse_seeds

__all__ = ["CVResult", "parse_folds", "parse_seeds", "fold_count", "cv_runs", "run_cv", "aggregate_metrics",
           "run_label"]

# Config keys that do not change what a run computes: a finished run is reused whatever they say.
_NEUTRAL_KEYS = ("out_dir", "device", "num_workers", "progress", "resume", "keep_checkpoints", "tensorboard",
                 "folds", "seeds")
# Sources with the MMIN layout's numbered folds, by the loader kind of mmer_ext.data.iemocap.
_FOLD_SOURCES = {"iemocap": "iemocap", "msp": "msp", "msp_improv": "msp", "msp-improv": "msp"}


def fold_count(data: str) -> int:
    """The number of folds of a data source: ``total_cv`` of an IEMOCAP (10) or MSP-IMPROV (12) layout."""
    from mmer_ext.data.iemocap import _resolve

    source, _, arg = data.partition(":")
    kind = _FOLD_SOURCES.get(source.strip().lower())
    if kind is None or not arg:
        raise ConfigError(f"folds: data {data!r} has no cross-validation folds (only the iemocap: and msp: layouts "
                          "do); repeat over seeds with --seeds instead")
    return int(_resolve(arg, kind)[2])


def parse_folds(text: str | None, data: str) -> list[int] | None:
    """``"all"`` -> every fold of the layout; ``"1,2,3"`` or ``"1-5"`` -> those folds; ``None`` -> no CV."""
    if text is None:
        return None
    total = fold_count(data)
    text = str(text).strip().lower()
    if text == "all":
        return list(range(1, total + 1))
    folds = int_list(text, "folds")
    bad = [f for f in folds if not 1 <= f <= total]
    if bad:
        raise ConfigError(f"folds: {bad} outside 1..{total}, the folds of {data!r}")
    return folds


def run_label(fold: int | None, seed: int | None) -> str:
    """The subdirectory of one run: ``fold-03-seed-1``, ``fold-03`` or ``seed-1``."""
    parts = ([f"fold-{fold:02d}"] if fold is not None else []) + ([f"seed-{seed}"] if seed is not None else [])
    return "-".join(parts)


def cv_runs(cfg: TrainConfig) -> list[tuple[int | None, int | None]]:
    """The ``(fold, seed)`` pairs of a config, fold-major (``None`` where that axis does not vary); empty when the
    config asks for a single run."""
    folds = parse_folds(cfg.folds, cfg.data)
    seeds = parse_seeds(cfg.seeds, cfg.seed)
    if folds is None and seeds is None:
        return []
    return [(f, s) for f in (folds or [None]) for s in (seeds or [None])]


@dataclass
class CVResult:
    out_dir: Path
    runs: list[dict[str, Any]]  # {"fold", "seed", "dir", "metrics", "reused"}
    mean: dict[str, Any]
    std: dict[str, Any]
    confusion: dict[str, list[list[int]]] | None
    files: list[Path]


def _numeric_blocks(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The ``{condition or MR: {metric: value}}`` part of a run's metrics (without per-class lists and matrices)."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, dict) and v and all(isinstance(x, (int, float)) or x is None for x in v.values())}


def aggregate_metrics(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Mean and sample standard deviation (ddof = 1; NaN for a single run) of every metric under every condition
    over the runs' metrics; ``per_class_F1`` lists are averaged element-wise."""
    if not runs:
        raise ValueError("no runs to aggregate")
    blocks = [_numeric_blocks(m) for m in runs]
    mean: dict[str, Any] = {}
    std: dict[str, Any] = {}
    for key in dict.fromkeys(k for b in blocks for k in b):
        names = dict.fromkeys(n for b in blocks if key in b for n in b[key])
        mean[key], std[key] = {}, {}
        for name in names:
            values = np.array([math.nan if b.get(key, {}).get(name) is None else float(b[key][name])
                               for b in blocks], dtype=np.float64)
            mean[key][name] = float(np.mean(values))
            std[key][name] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    per_class = [m["per_class_F1"] for m in runs if "per_class_F1" in m]
    if per_class and len(per_class) == len(runs):
        arr = np.array(per_class, dtype=np.float64)
        mean["per_class_F1"] = arr.mean(axis=0).tolist()
        std["per_class_F1"] = (arr.std(axis=0, ddof=1) if len(arr) > 1 else np.full(arr.shape[1], math.nan)).tolist()
    return mean, std


def _summed_confusion(runs: list[dict[str, Any]]) -> dict[str, list[list[int]]] | None:
    mats = [m.get("confusion") for m in runs]
    if not mats or any(c is None for c in mats):
        return None
    keys = [k for k in mats[0] if all(k in c for c in mats)]
    return {k: np.sum([np.asarray(c[k], dtype=np.int64) for c in mats], axis=0).tolist() for k in keys}


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _NEUTRAL_KEYS}


def _finished(run_dir: Path, sub_cfg: TrainConfig) -> dict[str, Any] | None:
    """The saved test metrics of a run that finished under the same settings; a finished run under other settings
    is refused, as a stage is (resuming would mix two experiments in one mean)."""
    metrics_file, run_file = run_dir / "test_metrics.json", run_dir / "run.json"
    if not (metrics_file.is_file() and run_file.is_file()):
        return None
    old = _comparable(json.loads(run_file.read_text())["config"])
    new = _comparable(json.loads(json.dumps(config_to_dict(sub_cfg), default=str)))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        raise ConfigError(f"{run_dir} holds a run trained with other settings ({', '.join(changed)}); "
                          "train into another --out, or pass --no-resume to retrain every run")
    return json.loads(metrics_file.read_text())["metrics"]


def run_cv(cfg: TrainConfig, *, log: Callable[[str], None] | None = None,
           splits_for: Callable[[TrainConfig], dict[str, Any]] | None = None) -> CVResult:
    """Train every ``(fold, seed)`` run of ``cfg`` (``cfg.folds`` / ``cfg.seeds``), then write the aggregate tables
    and figures into ``cfg.out_dir``. ``splits_for(sub_config)``: the data of one run (default: loaded from
    ``cfg.data`` with the run's fold and seed)."""
    from mmer_ext.train.distributed import init_distributed, resolve_device
    from mmer_ext.train.trainer import fit

    say = log or print
    pairs = cv_runs(cfg)
    if not pairs:
        raise ConfigError("run_cv needs folds or seeds (--folds all, --folds 1,2,3, --seeds 3)")
    out_dir = Path(cfg.out_dir)
    folds = sorted({f for f, _ in pairs if f is not None})
    seeds = sorted({s for _, s in pairs if s is not None})
    say(f"cross-validation: {len(pairs)} runs of {cfg.model} on {cfg.data}"
        + (f", folds {folds}" if folds else "") + (f", seeds {seeds}" if seeds else "")
        + f"; each in {out_dir}/<fold-NN-seed-S>/, finished runs are reused")
    runs: list[dict[str, Any]] = []
    for i, (fold, seed) in enumerate(pairs):
        label = run_label(fold, seed)
        sub = replace(cfg, fold=cfg.fold if fold is None else fold, seed=cfg.seed if seed is None else seed,
                      out_dir=str(out_dir / label), folds=None, seeds=None)
        metrics = _finished(out_dir / label, sub) if cfg.resume else None
        reused = metrics is not None
        if reused:
            say(f"[{i + 1}/{len(pairs)}] {label}: finished before, reused")
        else:
            say(f"[{i + 1}/{len(pairs)}] {label}")
            result = fit(sub, splits=splits_for(sub) if splits_for else None, log=log)
            metrics = result.test_metrics
        runs.append({"fold": fold, "seed": sub.seed if seed is not None else None, "dir": label,
                     "metrics": metrics, "reused": reused})
    ctx = init_distributed(resolve_device(cfg.device))
    files: list[Path] = []
    mean, std = aggregate_metrics([r["metrics"] for r in runs]) if runs[0]["metrics"] is not None else ({}, {})
    confusion = _summed_confusion([r["metrics"] for r in runs]) if mean else None
    if ctx.is_main and mean:
        files = write_cv_outputs(out_dir, cfg, runs, mean, std, confusion)
    ctx.barrier()
    return CVResult(out_dir, runs, mean, std, confusion, files)


def _row_name(run: dict[str, Any]) -> str:
    parts = ([f"fold {run['fold']}"] if run["fold"] is not None else []) + (
        [f"seed {run['seed']}"] if run["seed"] is not None else [])
    return " / ".join(parts)


def write_cv_outputs(out_dir: Path, cfg: TrainConfig, runs: list[dict[str, Any]], mean: dict[str, Any],
                     std: dict[str, Any], confusion: dict[str, list[list[int]]] | None) -> list[Path]:
    from mmer_ext import report

    per_run = {_row_name(r): r["metrics"] for r in runs}
    table = {**per_run, "mean": mean, "std": std}
    regression = report.is_missing_rate_results(mean)
    paths = [report.write_results_json(out_dir / "cv_results.json", {
        "model": cfg.model, "data": cfg.data, "n_runs": len(runs),
        "runs": [{k: r[k] for k in ("fold", "seed", "dir", "reused", "metrics")} for r in runs],
        "mean": mean, "std": std, "std_ddof": 1, "confusion_summed": confusion,
    }, config=config_to_dict(cfg))]
    n = f"{len(runs)} runs"
    if regression:
        paths.append(report.write_missing_rate_csv(out_dir / "cv_results.csv", table))
        summary = report.markdown_mean_std_table({cfg.model: (mean, std)}, regression=True)
        per_rows = report.markdown_missing_rate_table(per_run)
        metric = "Acc2_non0"
    else:
        paths.append(report.write_table_csv(out_dir / "cv_results.csv", table, metrics=("WA", "UA", "F1", "WF1")))
        summary = report.markdown_mean_std_table({cfg.model: (mean, std)})
        per_rows = report.markdown_table(per_run, metrics=("WA", "UA"))
        metric = "UA"
    spread = report.plot_run_spread(out_dir / "cv_spread.png", per_run, metric=metric,
                                    title=f"{cfg.model} on {cfg.data}: {metric} over {n}")
    paths.append(spread)
    figures = [f"![{metric} per condition over the runs](cv_spread.png)"]
    if confusion is not None:
        class_names = _class_names(out_dir / runs[0]["dir"], len(confusion["overall"]))
        paths.append(report.plot_confusion_matrices(
            out_dir / "cv_confusion_matrices.png", confusion, class_names,
            title=f"{cfg.model}: test confusion summed over {n} (rows: true class)"))
        figures.append("![confusion summed over the runs](cv_confusion_matrices.png)")
    text = (f"# {cfg.model} on {cfg.data}: {n}\n\n"
            f"Mean ± sample standard deviation (ddof = 1) over {n}"
            + ("" if regression else "; WA / UA / F1 in percent per available-modality condition") + ".\n\n"
            + summary + "\n## Per run\n\n" + per_rows + "\n" + "\n\n".join(figures) + "\n")
    paths.append(report.atomic_write_text(out_dir / "cv_results.md", text))
    return paths


def _class_names(run_dir: Path, k: int) -> list[str]:
    try:
        names = json.loads((run_dir / "run.json").read_text())["class_names"]
        if len(names) == k:
            return [str(n) for n in names]
    except (OSError, KeyError, ValueError):
        pass
    return [str(i) for i in range(k)]
