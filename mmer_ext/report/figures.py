"""Figures of an experiment, drawn with matplotlib's object-oriented API on an Agg canvas (never ``pyplot``: no
display needed, the user's backend untouched, no figures leaked into a global manager) and saved atomically."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmer_ext._atomic import atomic_open
from mmer_ext.metrics import NUM_MISSING_CONDITIONS
from mmer_ext.report.tables import (
    AS_IS_METRICS,
    MISSING_CELL,
    TABLE_CONDITIONS,
    check_results,
    is_missing_rate_results,
    metric_value,
    missing_rate_table,
    model_cells,
    results_table,
)

PathLike = str | os.PathLike


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
    check_results(runs)
    if not runs:
        raise ValueError("no runs to plot")
    first = next(iter(runs.values()))
    if is_missing_rate_results(first):
        keys = sorted(k for k in first if str(k).startswith("MR="))
    else:
        keys = list(TABLE_CONDITIONS)
    scale = 1.0 if metric in AS_IS_METRICS else 100.0
    columns = []
    for key in keys:
        cells = [(model_cells(m, metric)[key] if key in TABLE_CONDITIONS else metric_value(m.get(key), metric))
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
