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
    p.add_argument("--missing-rates", type=float, nargs="+", metavar="MR",
                   help="imder: the missing rates to evaluate at (default: as in training, 0.0 ... 0.7)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
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
                                 seed=cfg["seed"])
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(format_results(meta["recipe"], metrics))
    return 0
