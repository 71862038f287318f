"""``mmer-ext evaluate``: a trained model under the six missing conditions and full, on a split of its data."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any


def add_parser(sub) -> None:
    from mmer_ext.cli._help import HelpFormatter, config_help
    from mmer_ext.data.sources import data_spec_help
    from mmer_ext.train.config import CORRUPTIONS

    p = sub.add_parser(
        "evaluate", help="evaluate a model.safetensors under the six missing conditions and full",
        formatter_class=HelpFormatter,
        description="Evaluate a trained model on a split of its data: the six missing-modality conditions and full "
                    "(IMDer: its missing-rate sweep). Prints the table and writes it as JSON, CSV and markdown, with "
                    "a chart, next to the checkpoint (or into --out).",
        epilog=f"data sources (--data SPEC):\n{data_spec_help()}\n\n"
               "examples:\n  mmer-ext evaluate runs/train/model.safetensors\n"
               "  mmer-ext evaluate runs/train/model.safetensors --corruption gaussian --noise-steps 20 --out eval/\n"
               "  mmer-ext evaluate runs/imder/model.safetensors --missing-rates 0.0 0.5 --json\n")
    p.add_argument("checkpoint", help="a model.safetensors written by mmer-ext train")
    p.add_argument("--data", metavar="SPEC", help="data source (default: the one the model was trained on)")
    p.add_argument("--fold", type=int, help="fold of the real data (default: the training fold)")
    p.add_argument("--split", choices=("test", "val", "train"), default="test",
                   help="the split to evaluate (default test)")
    p.add_argument("--corruption", choices=CORRUPTIONS,
                   help="how missing modalities are presented (default: as in training)")
    p.add_argument("--noise-steps", type=int, help="noise intensity T for gaussian/impulse (default: as in training)")
    p.add_argument("--missing-rates", type=float, nargs="+", metavar="MR",
                   help="imder: the missing rates to evaluate at (default: as in training, 0.0 ... 0.7)")
    p.add_argument("--device", default="auto", help=config_help("device"))
    p.add_argument("--out", metavar="DIR",
                   help="where the tables and the chart go (default: the checkpoint's directory)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON (the file paths go to stderr)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the checkpoint's SHA-256 check (the tensors are still checked against the model)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmer_ext.data import DataFormatError, data_kind
    from mmer_ext.report import format_results
    from mmer_ext.train import evaluate_model, load_model
    from mmer_ext.train.config import ConfigError, check_field
    from mmer_ext.train.evaluation import evaluate_missing_rates
    from mmer_ext.train.trainer import load_data
    from mmer_ext.train.views import check_data_kind, views_for
    from mmer_ext.train.distributed import resolve_device

    # An explicit value, zero included, is used as given (and checked like the training flag); None means "as trained".
    explicit = (("fold", args.fold), ("noise_steps", args.noise_steps), ("eval_missing_rates", args.missing_rates))
    for name, value in explicit:
        if value is not None:
            check_field(name, value)
    device = resolve_device(args.device)
    model, meta = load_model(args.checkpoint, map_location=device, verify=args.verify)
    cfg = meta["config"]
    same_source = args.data is None or args.data == cfg["data"]
    data = cfg["data"] if args.data is None else args.data
    check_data_kind(meta["recipe"], data, data_kind(data))
    options = cfg.get("data_options", {}) if same_source else {}
    splits = load_data(data, fold=cfg["fold"] if args.fold is None else args.fold, seed=cfg["seed"], options=options)
    dataset = splits.get(args.split)
    if dataset is None or len(dataset) == 0:
        raise DataFormatError(f"data {data!r} has no (or an empty) {args.split!r} split")
    check_data_kind(meta["recipe"], data, views_for(dataset).kind)
    if tuple(dataset.dims) != tuple(meta["dims"]):
        from mmer_ext.train import CheckpointError

        raise CheckpointError(f"the model expects feature dims {tuple(meta['dims'])} (A, V, L); "
                              f"{data!r} has {tuple(dataset.dims)}")
    # A flag the model has no use for would be ignored without a word: say so instead.
    sequences = views_for(dataset).kind == "sequences"
    unused = ([("--corruption", args.corruption), ("--noise-steps", args.noise_steps)] if sequences
              else [("--missing-rates", args.missing_rates)])
    for flag, value in unused:
        if value is not None:
            raise ConfigError(f"{flag} does not apply to {meta['recipe']} ("
                              f"{'IMDer evaluates at missing rates' if sequences else 'it is not an IMDer model'})")
    if sequences:
        rates = cfg["eval_missing_rates"] if args.missing_rates is None else args.missing_rates
        metrics = evaluate_missing_rates(model, dataset, rates=rates, protocol=cfg["missing_protocol"],
                                         device=device, seed=cfg["seed"])
    else:
        metrics = evaluate_model(model, dataset, num_classes=meta["num_classes"], device=device,
                                 corruption=args.corruption or meta["corruption"],
                                 noise_steps=meta["noise_steps"] if args.noise_steps is None else args.noise_steps,
                                 seed=cfg["seed"], noise_padding=_recipe_noise_padding(meta["recipe"]),
                                 with_per_class=True)
    out_dir = Path(args.out) if args.out else Path(args.checkpoint).parent
    settings = {"checkpoint": str(args.checkpoint), "recipe": meta["recipe"], "data": data, "split": args.split,
                "fold": cfg["fold"] if args.fold is None else args.fold}
    if views_for(dataset).kind == "sequences":
        settings.update(missing_protocol=cfg["missing_protocol"], missing_rates=list(rates))
    else:
        settings.update(corruption=args.corruption or meta["corruption"],
                        noise_steps=meta["noise_steps"] if args.noise_steps is None else args.noise_steps)
    written = write_evaluation(out_dir, evaluation_stem(settings, same_source), meta["recipe"], metrics, settings,
                               class_names=meta.get("class_names"))
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(format_results(meta["recipe"], metrics))
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr if args.json else sys.stdout)
    return 0


def evaluation_stem(settings: dict[str, Any], same_source: bool) -> str:
    """``eval-<split>[-<corruption>[-T<steps>]][-<data>]``: evaluations under other settings do not overwrite
    each other."""
    parts = ["eval", settings["split"]]
    if "corruption" in settings:
        parts.append(settings["corruption"])
        if settings["corruption"] != "zero":
            parts.append(f"T{settings['noise_steps']}")
    else:
        parts.append(settings["missing_protocol"])
    if not same_source:
        parts.append(re.sub(r"[^A-Za-z0-9.]+", "_", os.path.basename(settings["data"].rstrip("/\\")) or
                            settings["data"]).strip("_")[:40])
    return "-".join(parts)


def write_evaluation(out_dir: Path, stem: str, model: str, metrics: dict[str, Any],
                     settings: dict[str, Any], class_names: list[str] | None = None) -> list[Path]:
    """The metrics as JSON (with the settings and the environment), the table as CSV and markdown, and the chart:
    UA per missing condition, or IMDer's metrics per missing rate; for classification also the confusion matrices
    per condition (``<stem>-confusion.png``)."""
    from mmer_ext import report

    out_dir.mkdir(parents=True, exist_ok=True)
    results = {model: metrics}
    paths = [report.write_results_json(out_dir / f"{stem}.json", {"settings": settings, "metrics": metrics})]
    if any(str(k).startswith("MR=") for k in metrics):
        paths.append(report.write_missing_rate_csv(out_dir / f"{stem}.csv", results))
        markdown = report.markdown_missing_rate_table(results)
        chart = report.plot_missing_rate_curve(out_dir / f"{stem}.png", results,
                                               title=f"{model} on {settings['data']} ({settings['split']})")
    else:
        columns = tuple(m for m in ("WA", "UA", "F1", "WF1")
                        if any(isinstance(v, dict) and m in v for v in metrics.values()))
        paths.append(report.write_table_csv(out_dir / f"{stem}.csv", results, metrics=columns))
        # The paper's layout (WA, UA; MMGCN's weighted F1 too) keeps the markdown readable; the CSV has every metric.
        shown = ("WA", "UA", "WF1") if model.startswith("mmgcn") else ("WA", "UA")
        markdown = report.markdown_table(results, metrics=tuple(m for m in shown if m in columns))
        chart = report.plot_ua_per_condition(out_dir / f"{stem}.png", results,
                                             title=f"{model} on {settings['data']} ({settings['split']}, "
                                                   f"missing = {settings['corruption']})")
    header = (f"# {model}: {settings['split']} split of {settings['data']}\n\n"
              + "".join(f"- {k}: {v}\n" for k, v in settings.items()) + "\n")
    paths.append(report.atomic_write_text(out_dir / f"{stem}.md", header + markdown))
    paths.append(chart)
    if "confusion" in metrics:
        names = class_names or [str(i) for i in range(len(metrics["confusion"]["overall"]))]
        paths.append(report.plot_confusion_matrices(
            out_dir / f"{stem}-confusion.png", metrics["confusion"], names,
            title=f"{model} on {settings['data']} ({settings['split']}): confusion per condition"))
    return paths


def _recipe_noise_padding(recipe: str) -> bool:
    """Whether the recipe that trained the checkpoint noises padding frames (``nmer-authors``)."""
    from mmer_ext.models.recipes import RECIPES

    stages = RECIPES.get(recipe)
    return bool(stages and stages[-1].noise_padding)
