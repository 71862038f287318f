"""``mmer-ext evaluate``: a trained model under the six missing conditions and full, on a split of its data."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a model.safetensors under the six missing conditions and full")
    p.add_argument("checkpoint", help="a model.safetensors written by mmer-ext train")
    p.add_argument("--data", help="data source (default: the one the model was trained on)")
    p.add_argument("--fold", type=int, help="fold of the real data (default: the training fold)")
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--corruption", choices=("zero", "gaussian", "impulse"),
                   help="how missing modalities are presented (default: as in training)")
    p.add_argument("--noise-steps", type=int, help="noise intensity T for gaussian/impulse (default: as in training)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmer_ext.data import load_dataset
    from mmer_ext.report import format_table
    from mmer_ext.train import evaluate_model, load_model
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
    metrics = evaluate_model(model, dataset, num_classes=meta["num_classes"], device=device,
                             corruption=args.corruption or meta["corruption"],
                             noise_steps=args.noise_steps or meta["noise_steps"], seed=cfg["seed"])
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(format_table({meta["recipe"]: metrics}))
    return 0
