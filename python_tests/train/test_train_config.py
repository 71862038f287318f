"""Configs: defaults < file (YAML / TOML) < flags < key=value overrides, with errors that name the key."""

from __future__ import annotations

import pytest

from mmer_ext.train import ConfigError, TrainConfig, load_config


def test_defaults():
    assert load_config() == TrainConfig()


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_file_then_flags_then_overrides(tmp_path, suffix):
    path = tmp_path / f"cfg{suffix}"
    if suffix == ".yaml":
        path.write_text("model: ifmmin\nepochs: 3\nlr: 0.001\ndata_options:\n  preset: small\n")
    else:
        path.write_text('model = "ifmmin"\nepochs = 3\nlr = 0.001\n[data_options]\npreset = "small"\n')
    cfg = load_config(path)
    assert (cfg.model, cfg.epochs, cfg.lr, cfg.data_options) == ("ifmmin", 3, 0.001, {"preset": "small"})
    cfg = load_config(path, ["epochs=5", "data_options.n_train=64", "hparams.student.cycle_weight=1.5"], epochs=4)
    assert cfg.epochs == 5  # an override beats a flag, a flag beats the file
    assert cfg.data_options == {"preset": "small", "n_train": 64}
    assert cfg.hparams == {"student": {"cycle_weight": 1.5}}
    assert load_config(path, epochs=4).epochs == 4
    assert load_config(path, epochs=None).epochs == 3  # an unset flag keeps the file's value


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["epoch=3"], "epoch"),
        (["epochs=abc"], "epochs"),
        (["epochs"], "key=value"),
        (["model=gcn"], "model 'gcn'"),
        (["epochs=0"], "epochs must be at least 1"),
        (["corruption=blur"], "corruption 'blur'"),
        (["device=tpu"], "device 'tpu'"),
        (["lr=-1"], "lr must be positive"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.toml"
    bad.write_text("model = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)
    other = tmp_path / "cfg.json"
    other.write_text("{}")
    with pytest.raises(ConfigError, match="unknown format"):
        load_config(other)


def test_stage_epochs_and_recipe_split():
    from mmer_ext.train import resolve_stages

    stages = resolve_stages(load_config(None, ["model=mmin", "epochs=4", "stage_epochs.student=10"]))
    # teacher: 4 total, recipe 10+10 -> 2+2; student: 10 total, recipe 30+30 -> 5+5
    assert [(s.name, s.epochs, s.epochs_decay) for s in stages] == [("teacher", 2, 2), ("student", 5, 5)]
    stages = resolve_stages(load_config(None, ["model=baseline"]))
    assert [(s.epochs, s.epochs_decay) for s in stages] == [(10, 10)]
    stages = resolve_stages(load_config(None, ["model=baseline", "epochs=3", "epochs_decay=0"]))
    assert [(s.epochs, s.epochs_decay) for s in stages] == [(3, 0)]


def test_unknown_stage_or_hparam_is_named(tiny_splits, tmp_path):
    from mmer_ext.train import fit, resolve_stages

    with pytest.raises(ConfigError, match=r"stage\(s\) \['student'\]"):
        resolve_stages(load_config(None, ["model=baseline", "stage_epochs.student=3"]))
    with pytest.raises(ConfigError, match=r"stage\(s\) \['main'\]"):
        resolve_stages(load_config(None, ["model=mmin", "hparams.main.dropout=0.1"]))
    cfg = load_config(None, ["model=baseline", "hparams.main.dropuot=0.1", f"out_dir={tmp_path}", "epochs=1"])
    with pytest.raises(ConfigError, match="hparams.main: UttFusion rejects"):
        fit(cfg, splits=tiny_splits, log=lambda m: None)


def test_every_field_declares_its_limits():
    """The accepted values live next to each field (Limits in its metadata), checked in one place (validate)."""
    from dataclasses import fields

    # Checked by the loaders / the model constructors, or booleans.
    free_form = {"data_options", "hparams", "progress", "resume", "tensorboard"}
    undeclared = [f.name for f in fields(TrainConfig) if f.name not in free_form and f.metadata.get("limits") is None]
    assert not undeclared, f"declare Limits for {undeclared} with _limited(...) in mmer_ext/train/config.py"


@pytest.mark.parametrize("overrides, message", [
    (["num_workers=-1"], "num_workers must be >= 0, got -1"),
    (["seed=-1"], "seed must be >= 0"),
    ([f"seed={2**70}"], "seed must be at most"),
    (["lr=inf"], "lr must be a finite number"),
    (["lr=0"], "lr must be positive"),
    (["batch_size=0"], "batch_size must be at least 1"),
    (["noise_steps=0"], "noise_steps must be at least 1"),
    (["fold=0"], "fold must be at least 1"),
    (["epochs_decay=-1"], "epochs_decay must be >= 0"),
    (["stage_epochs.main=0"], "stage_epochs.main must be at least 1"),
    (["missing_rate=0.35"], "missing_rate 0.35 is not one of IMDer's missing rates"),
    (["eval_missing_rates=[0.1,0.9]"], "eval_missing_rates 0.9 is not one of IMDer's missing rates"),
    (["sampler=rk4"], "sampler 'rk4' is not one of"),
    (["sampler_steps=0"], "sampler_steps must be at least 1"),
    (["missing_protocol=per-epoch"], "missing_protocol 'per-epoch' is not one of"),
    (["device=cuda:abc"], "device 'cuda:abc' must be auto, cpu, cuda or cuda:N"),
    (["hparams.main=3"], "hparams.main must map constructor arguments"),
])
def test_limits_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_validate_checks_a_config_built_in_code(tmp_path):
    from mmer_ext.train import fit
    from mmer_ext.train.config import validate

    cfg = TrainConfig(num_workers=-2, out_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="num_workers must be >= 0, got -2"):
        validate(cfg)
    with pytest.raises(ConfigError, match="num_workers"):
        fit(cfg)  # fit validates too, before anything is loaded or written
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="out_dir ' ' must be a directory path"):
        validate(TrainConfig(out_dir=" "))


def test_config_choices_are_the_owners_names():
    # config.py reads recipe and sampler names from their owners, lazily (the owners load the compiled ops).
    from mmer_ext.data.protocols import CORRUPTION_MODES, MR_PROTOCOLS
    from mmer_ext.models.recipes import RECIPES
    from mmer_ext.sampling import SAMPLERS
    from mmer_ext.train import config

    assert tuple(config.MODELS) == tuple(RECIPES)
    assert tuple(config.SAMPLER_NAMES) == tuple(SAMPLERS)
    assert config.CORRUPTIONS == tuple(CORRUPTION_MODES) and config.MISSING_PROTOCOLS == tuple(MR_PROTOCOLS)
