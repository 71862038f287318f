"""``mmer-ext evaluate``: a trained model under the six missing conditions and full, on a split of its data."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    from mmer_ext.cli._help import HelpFormatter
    from mmer_ext.data.specs import data_spec_help

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
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--corruption", choices=("zero", "gaussian", "impulse"),
                   help="how missing modalities are presented (default: as in training)")
    p.add_argument("--noise-steps", type=int, help="noise intensity T for gaussian/impulse (default: as in training)")
    p.add_argument("--missing-rates", type=float, nargs="+", metavar="MR",
                   help="imder: the missing rates to evaluate at (default: as in training, 0.0 ... 0.7)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmer_ext.data import MISSING_RATES, load_dataset
    from mmer_ext.report import format_results
    from mmer_ext.train import ConfigError, evaluate_model, load_model
    from mmer_ext.train.evaluation import evaluate_missing_rates
    from mmer_ext.train.views import views_for
    from mmer_ext.train.distributed import resolve_device

    device = resolve_device(args.device)
    model, meta = load_model(args.checkpoint, map_location=device)
    cfg = meta["config"]
    same_source = args.data is None or args.data == cfg["data"]
    data = args.data or cfg["data"]
    options = cfg.get("data_options", {}) if same_source else {}
    splits = load_dataset(data, fold=args.fold or cfg["fold"], seed=cfg["seed"], **options)
    dataset = splits[args.split]
    if tuple(dataset.dims) != tuple(meta["dims"]):
        from mmer_ext.train import CheckpointError

        raise CheckpointError(f"the model expects feature dims {tuple(meta['dims'])} (A, V, L); "
                              f"{data!r} has {tuple(dataset.dims)}")
    if views_for(dataset).kind == "sequences":
        rates = args.missing_rates or cfg["eval_missing_rates"]
        bad = [mr for mr in rates if not any(abs(mr - r) < 1e-9 for r in MISSING_RATES)]
        if bad:
            raise ConfigError(f"--missing-rates {bad} not among IMDer's missing rates {list(MISSING_RATES)}")
        metrics = evaluate_missing_rates(model, dataset, rates=rates, protocol=cfg["missing_protocol"],
                                         device=device, seed=cfg["seed"])
    else:
        metrics = evaluate_model(model, dataset, num_classes=meta["num_classes"], device=device,
                                 corruption=args.corruption or meta["corruption"],
                                 noise_steps=args.noise_steps or meta["noise_steps"], seed=cfg["seed"])
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(format_results(meta["recipe"], metrics))
    return 0
