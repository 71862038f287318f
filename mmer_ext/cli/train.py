"""``mmer-ext train``: one model's whole recipe (teacher, then student) on one data source and fold."""

from __future__ import annotations

import argparse

from mmer_ext.train.config import MISSING_PROTOCOLS, MODELS, SAMPLER_NAMES


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (both stages of a two-stage recipe) and evaluate it on the test split",
                       description="Flags override the config file; --set KEY=VALUE overrides both "
                                   "(e.g. --set data_options.preset=small --set hparams.student.cycle_weight=1).")
    p.add_argument("--model", choices=MODELS)
    p.add_argument("--data", help="synthetic (default), synthetic:small, iemocap:PATH or msp:PATH; for mmgcn "
                   "synthetic-dialogue, iemocap-erc:PATH, meld:PATH or dialogues:DIR")
    p.add_argument("--fold", type=int, help="cross-validation fold of the real data (1-based)")
    p.add_argument("--config", help="a YAML or TOML file with TrainConfig fields")
    p.add_argument("--out", dest="out_dir", help="run directory (default runs/train)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--epochs", type=int, help="epochs per stage (the recipe's constant/decay split is kept)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--corruption", choices=("zero", "gaussian", "impulse"),
                   help="how missing modalities are presented (default: the recipe's)")
    p.add_argument("--noise-steps", type=int, help="NMER noise scheduler intensity T (default 100)")
    p.add_argument("--sampler", choices=SAMPLER_NAMES,
                   help="imder: the recovery sampler -- em (Euler-Maruyama, the authors'), pc (predictor-corrector), "
                        "ode (probability-flow Euler), ode-heun, ddim (default: the recipe's em)")
    p.add_argument("--steps", dest="sampler_steps", type=int, help="imder: sampler steps (default 100)")
    p.add_argument("--missing-rate", type=float,
                   help="imder: missing rate MR of the missing-data stage, one of 0.0 ... 0.7 (default 0.1)")
    p.add_argument("--missing-protocol", choices=MISSING_PROTOCOLS,
                   help="imder: per-sample missing patterns (default) or the authors' per-batch ones")
    p.add_argument("--select-on-test", action="store_true",
                   help="dialogue data: the MMGCN authors' protocol, no validation split, epochs selected on the "
                        "test set (optimistic; the default carves a validation split from train)")
    p.add_argument("--teacher", help="model.safetensors of an already trained first stage (skips training it)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    p.add_argument("--no-resume", dest="resume", action="store_const", const=False,
                   help="retrain from scratch even if OUT holds checkpoints")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmer_ext.report import format_results
    from mmer_ext.train import fit, load_config

    fields = {k: getattr(args, k) for k in ("model", "data", "fold", "out_dir", "seed", "device", "epochs",
                                            "batch_size", "lr", "corruption", "noise_steps", "progress", "resume", "sampler",
                                            "sampler_steps", "missing_rate", "missing_protocol")}
    overrides = list(args.overrides)
    if args.select_on_test:
        overrides.insert(0, "data_options.val_from=test")
    cfg = load_config(args.config, overrides, **fields)
    result = fit(cfg, teacher_checkpoint=args.teacher)
    if result.test_metrics is not None:
        print(format_results(cfg.model, result.test_metrics))
        print(f"wrote {result.out_dir / 'model.safetensors'} and {result.out_dir / 'test_metrics.json'}")
    return 0
