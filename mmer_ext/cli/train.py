"""``mmer-ext train``: one model's whole recipe (teacher, then student) on one data source and fold.

The flags are generated from :class:`mmer_ext.train.TrainConfig`'s fields and their help metadata, so a config key,
its flag and its help cannot drift apart; only what is not a config key (``--config``, ``--set``, ``--teacher``,
``--select-on-test``) is declared here.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
import types
import typing
from typing import Any

from mmer_ext.cli._help import HelpFormatter
from mmer_ext.data.sources import data_spec_help
from mmer_ext.train.config import OwnedChoices, TrainConfig

EXAMPLES = """\
examples:
  # a minute on a CPU: MMIN, 2 epochs per stage, on the small synthetic preset
  mmer-ext train --model mmin --data synthetic:small --epochs 2 --out runs/mmin-try
  # the paper's recipe on IEMOCAP features, fold 3, from a YAML file with one override
  mmer-ext train --config mmin.yaml --data iemocap:/data/IEMOCAP --fold 3 --set hparams.student.cycle_weight=1
  # the paper's protocol: all 10 IEMOCAP folds x 3 seeds, mean ± std per condition (resumable, run by run)
  mmer-ext train --model mmin --data iemocap:/data/IEMOCAP --folds all --seeds 3 --out runs/mmin-cv
  # IMDer at missing rate 0.3 with a 10-step DDIM sampler (half the ancestral noise)
  mmer-ext train --model imder --data synthetic-mosi:small --missing-rate 0.3 --sampler ddim --steps 10 --eta 0.5
"""

_BOOL_FLAG_HELP = {True: "--no-{name} turns it off", False: "--{name} turns it on"}


def _flag_type(hint: Any) -> tuple[type, bool]:
    """``(element type, is_list)`` of a field annotation such as ``int | None`` or ``list[float]``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _default_text(f: dataclasses.Field) -> str | None:
    if f.default is not dataclasses.MISSING:
        value = f.default
    else:
        value = f.default_factory()  # type: ignore[misc]
    if value is None or isinstance(value, bool):
        return None  # the help says what None means; a bool flag's help names its negation
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def config_flag_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", {}).get("flag", "") is not None]


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field that has one; every default is ``None`` so an unset flag leaves the
    config file's value alone."""
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("configuration (each flag sets the config key of its name)")
    for f in config_flag_fields():
        cli = f.metadata["cli"]
        flag = cli.get("flag") or "--" + f.name.replace("_", "-")
        kind, is_list = _flag_type(hints[f.name])
        help_text = f.metadata["help"]
        kwargs: dict[str, Any] = {"dest": f.name, "default": None}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            help_text += f" (default: {'on' if f.default else 'off'})"
        else:
            kwargs["type"] = kind
            # Without the compiled library the model and sampler names cannot be read; only --help runs then.
            if "choices" in cli and (not isinstance(cli["choices"], OwnedChoices) or OwnedChoices.available()):
                kwargs["choices"] = cli["choices"]
            if "metavar" in cli:
                kwargs["metavar"] = cli["metavar"]
            if is_list:
                kwargs["nargs"] = "+"
            default = _default_text(f)
            if default is not None:
                help_text += f" (default: {default})"
        group.add_argument(flag, help=help_text, **kwargs)


def _set_only_keys() -> str:
    keys = [f for f in dataclasses.fields(TrainConfig) if f not in config_flag_fields()]
    return "\n".join(textwrap.fill(f"{f.name}: {f.metadata['help']}", width=100, initial_indent="  ",
                                   subsequent_indent="    ") for f in keys)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model (both stages of a two-stage recipe) and evaluate it on the test split",
        formatter_class=HelpFormatter,
        description="Train one model's recipe and evaluate it on the test split. Settings come from the "
                    "defaults, then --config FILE, then the flags, then --set KEY=VALUE. The plan (stages, "
                    "epochs, data sizes, steps) is printed before training starts.",
        epilog=f"data sources (--data SPEC):\n{data_spec_help()}\n\n"
               f"config keys without a flag (set them with --set or in the config file):\n{_set_only_keys()}\n\n"
               + EXAMPLES)
    p.add_argument("--config", metavar="FILE", help="a YAML or TOML file with TrainConfig keys (see --set)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config key, dotted for nested ones (--set data_options.preset=small "
                        "--set hparams.student.cycle_weight=1); beats --config and the flags; repeatable")
    p.add_argument("--teacher", metavar="MODEL",
                   help="model.safetensors of an already trained first stage (skips training it)")
    p.add_argument("--select-on-test", action="store_true",
                   help="dialogue data: the MMGCN authors' protocol, no validation split, epochs selected on the "
                        "test set (optimistic; the default carves a validation split from train)")
    add_config_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmer_ext.report import format_results
    from mmer_ext.train import fit, load_config

    fields = {f.name: getattr(args, f.name) for f in config_flag_fields()}
    overrides = list(args.overrides)
    if args.select_on_test:
        overrides.insert(0, "data_options.val_from=test")
    cfg = load_config(args.config, overrides, **fields)
    if cfg.folds is not None or cfg.seeds is not None:
        return _run_cv(cfg, args)
    result = fit(cfg, teacher_checkpoint=args.teacher)
    if result.test_metrics is not None:
        print(format_results(cfg.model, result.test_metrics))
        print(f"wrote {result.out_dir / 'model.safetensors'} and {result.out_dir / 'test_metrics.json'}")
    return 0


def _run_cv(cfg, args: argparse.Namespace) -> int:
    from mmer_ext.report import format_mean_std_table, is_missing_rate_results
    from mmer_ext.train.config import ConfigError
    from mmer_ext.train.cv import run_cv

    if args.teacher is not None:
        raise ConfigError("--teacher names one run's first stage; it cannot serve every fold and seed of --folds / "
                          "--seeds")
    result = run_cv(cfg)
    if result.mean:
        regression = is_missing_rate_results(result.mean)
        print(format_mean_std_table({cfg.model: (result.mean, result.std)}, regression=regression))
        print("wrote " + ", ".join(str(p) for p in result.files))
    return 0
