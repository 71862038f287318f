"""What `--help` and `--version` tell a newcomer: flags generated from TrainConfig, every data source, examples that
parse."""

from __future__ import annotations

import dataclasses
import re
import shlex

import pytest
import torch

from mmer_ext.cli import build_parser, main
from mmer_ext.data import DataFormatError, load_dataset
from mmer_ext.data.sources import DATA_SPECS
from mmer_ext.train import TrainConfig, load_config

COMMANDS = ("train", "evaluate", "demo", "convert", "info")


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def _flat(text: str) -> str:
    # argparse wraps at spaces and after hyphens ("per-" / "sample")
    return re.sub(r"-\s+", "-", re.sub(r"\s+", " ", text))


def test_every_config_field_is_in_train_help(capsys):
    from mmer_ext.cli.train import config_flag_fields

    text = _flat(_help(capsys, "train"))
    flagged = {f.name for f in config_flag_fields()}
    for f in dataclasses.fields(TrainConfig):
        help_text = _flat(f.metadata["help"])
        assert help_text, f"TrainConfig.{f.name} has no help text"
        assert help_text in text, f.name
        if f.name not in flagged:
            assert f"{f.name}: " in text, f"{f.name} (no flag) is not listed among the --set-only keys"
    for flag in ("--model", "--data", "--out", "--steps", "--seed", "--lr", "--keep-checkpoints", "--no-progress",
                 "--no-resume", "--eval-missing-rates", "--set", "--config", "--teacher", "--select-on-test"):
        assert flag in text, flag


def test_seed_lr_and_set_have_help():
    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    helps = {opt: action.help for action in train._actions for opt in action.option_strings}
    for flag in ("--seed", "--lr", "--set", "--data", "--device", "--batch-size", "--epochs"):
        assert helps[flag] and len(helps[flag]) > 10, flag


def test_flags_map_onto_config_keys():
    from mmer_ext.cli.train import config_flag_fields

    args = build_parser().parse_args(["train", "--out", "o", "--steps", "5", "--no-progress", "--keep-checkpoints",
                                      "3", "--eval-missing-rates", "0.1", "0.2", "--no-resume", "--seed", "4",
                                      "--lr", "0.01", "--epochs-decay", "0", "--sampler", "ddim"])
    cfg = load_config(None, **{f.name: getattr(args, f.name) for f in config_flag_fields()})
    assert (cfg.out_dir, cfg.sampler_steps, cfg.progress, cfg.keep_checkpoints, cfg.eval_missing_rates) == (
        "o", 5, False, 3, [0.1, 0.2])
    assert (cfg.resume, cfg.seed, cfg.lr, cfg.epochs_decay, cfg.sampler) == (False, 4, 0.01, 0, "ddim")
    # An unset flag is None, so it leaves the config file's value (and the default) alone.
    untouched = build_parser().parse_args(["train"])
    assert all(getattr(untouched, f.name) is None for f in config_flag_fields())
    assert load_config(None, **{f.name: None for f in config_flag_fields()}) == TrainConfig()


def test_data_help_lists_every_source(capsys):
    for command in ("train", "evaluate"):
        text = _help(capsys, command)
        for spec in DATA_SPECS:
            assert spec.form in text, (command, spec.form)
    forms = " ".join(s.form for s in DATA_SPECS)
    for source in ("synthetic-mosi", "mmsa:", "mmsa-cache:", "cache:", "dialogues:", "meld:", "iemocap-erc:"):
        assert source in forms


@pytest.mark.parametrize("spec", DATA_SPECS, ids=lambda s: s.form)
def test_the_dispatcher_knows_every_documented_source(spec, tmp_path):
    """A documented form reaches its loader: a bad path or preset is reported, never an unknown source."""
    if "[" in spec.form:
        probe = f"{spec.source}:no-such-preset"
    elif ":" in spec.form:
        probe = f"{spec.source}:{tmp_path / 'missing'}"
    else:
        probe = spec.form
        if probe == "synthetic-mosi-small":
            probe += ":extra"  # takes no argument: rejected by its own branch
    with pytest.raises((DataFormatError, ValueError, FileNotFoundError)) as exc:
        load_dataset(probe)
    assert "unknown dataset source" not in str(exc.value) and "unknown dialogue source" not in str(exc.value)


def test_the_dispatcher_names_no_undocumented_source():
    with pytest.raises(DataFormatError) as exc:
        load_dataset("imagenet:x")
    listed = set(re.findall(r"[a-z][a-z-]*", str(exc.value).split("expected", 1)[1]))
    assert listed - {"a", "dialogue", "sentiment", "source", "or"} == {s.source for s in DATA_SPECS}


def test_version(capsys):
    from mmer_ext import _build_info

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"mmer-ext {_build_info.version}")
    assert f"torch {torch.__version__}" in out
    assert (f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA") in out
    assert "Python 3." in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_examples_that_parse(command, capsys):
    text = _help(capsys, command)
    assert "examples:" in text
    examples = [line.strip() for line in text.split("examples:", 1)[1].splitlines()
                if line.strip().startswith("mmer-ext ")]
    assert examples, command
    parser = build_parser()
    for line in examples:
        for part in line.split("&&"):
            argv = shlex.split(part.strip())[1:]
            argv = argv[: argv.index(">")] if ">" in argv else argv
            parser.parse_args(argv)  # SystemExit (a usage error) fails the test


def test_top_level_help_names_version_and_examples(capsys):
    text = _help(capsys)
    assert "--version" in text and "examples:" in text
    for command in COMMANDS:
        assert command in text
