"""Training configuration: defaults, a YAML or TOML file, then ``key=value`` overrides, validated by OmegaConf.

The recipe of a model (:data:`mmer_ext.models.recipes.RECIPES`) holds the paper's hyper-parameters; a field left at
``None`` here keeps the recipe's value, so a config file only names what it changes.
"""

from __future__ import annotations

import importlib
import math
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmer_ext.data.protocols import CORRUPTION_MODES, MISSING_RATES, MR_PROTOCOLS

__all__ = ["TrainConfig", "ConfigError", "Limits", "check_field", "load_config", "config_to_dict", "validate"]

class OwnedChoices(Sequence):
    """The allowed values of a field, read on first use from the module that owns them (the keys of
    ``module.attribute``), so the list is written once, where the things it names are defined.

    Lazy because the owners of the model and sampler names import the compiled ops, while the command line must build
    its parser without them (``mmer-ext train --help`` with a broken build); :meth:`available` says whether it can.
    """

    def __init__(self, module: str, attribute: str) -> None:
        self.module, self.attribute = module, attribute
        self._values: tuple[str, ...] | None = None

    @staticmethod
    def available() -> bool:
        import mmer_ext

        return mmer_ext.load_error is None

    def _resolve(self) -> tuple[str, ...]:
        if self._values is None:
            self._values = tuple(getattr(importlib.import_module(self.module), self.attribute))
        return self._values

    def __getitem__(self, index):  # type: ignore[override]
        return self._resolve()[index]

    def __len__(self) -> int:
        return len(self._resolve())

    def __repr__(self) -> str:
        return f"OwnedChoices({self.module}.{self.attribute})"


# Every list of choices belongs to the module that defines what it names.
MODELS = OwnedChoices("mmer_ext.models.recipes", "RECIPES")
SAMPLER_NAMES = OwnedChoices("mmer_ext.sampling", "SAMPLERS")  # IMDer's score-based recovery samplers
CORRUPTIONS = CORRUPTION_MODES
MISSING_PROTOCOLS = MR_PROTOCOLS


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the key."""


@dataclass(frozen=True)
class Limits:
    """The values a field accepts, declared next to the field and checked by :func:`validate` (the one place).

    ``ge`` / ``gt`` / ``le`` / ``lt``: bounds; ``choices``: the allowed values; ``pattern``: a full-match regular
    expression for strings (``what`` says it in words); ``each``: the limits apply to every value of a list or dict.
    ``None`` passes whenever the field's default is ``None`` (it means "the recipe's value"). Floats must be finite.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    pattern: str | None = None
    what: str | None = None
    each: bool = False


def _opt(default: Any = None, help: str = "", *, factory: Any = None, limits: Limits | None = None, **cli: Any) -> Any:
    """A config field with its command-line help (``metadata["help"]``), flag settings (``metadata["cli"]``:
    ``flag`` renames it, ``choices`` limits it, ``flag=None`` leaves it to ``--set`` and config files) and the values
    it accepts (``metadata["limits"]``, checked by :func:`validate` however the value was given)."""
    metadata = {"help": help, "cli": cli, "limits": limits}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# torch.manual_seed takes 64-bit seeds and the trainer mixes them modulo 2**63 - 1: beyond that two seeds would alias.
MAX_SEED = 2**63 - 2
MR_LIMITS = Limits(choices=tuple(MISSING_RATES), what="IMDer's missing rates")


@dataclass
class TrainConfig:
    """Everything ``mmer-ext train`` can set. The command line's flags and their help are generated from these
    fields (:mod:`mmer_ext.cli.train`); a field left at ``None`` keeps the recipe's value."""

    model: str = _opt("mmin", "the recipe to train; mmin, ifmmin and nmer train a teacher, then a student",
                      choices=MODELS, limits=Limits(choices=MODELS))
    data: str = _opt("synthetic", "data source, one of the forms listed under 'data sources' (mmer_ext.data.sources)",
                     metavar="SPEC", limits=Limits(pattern=r".+", what="a data source such as synthetic or "
                                                                                      "iemocap:PATH"))
    data_options: dict[str, Any] = _opt(
        factory=dict, help="extra keyword arguments of the data source (the synthetic set's preset and sizes, "
        "norm_method of the real features, ...)", flag=None)
    fold: int = _opt(1, "cross-validation fold of the real utterance data, 1-based", limits=Limits(ge=1))
    seed: int = _opt(0, "seeds the weights, the data order, the missing conditions and the synthetic data",
                     limits=Limits(ge=0, le=MAX_SEED))
    folds: str | None = _opt(None, "cross-validation: 'all' (every fold of the iemocap: / msp: layout, 10 / 12), a "
                                   "list '1,2,3' or a range '1-5'; each fold trains in its own subdirectory of --out "
                                   "and the results are aggregated as mean ± std (default: the one --fold)",
                             metavar="all|LIST",
                             limits=Limits(pattern=r"(?i)\s*all\s*|[\d,\s-]+",
                                           what="'all', a list like 1,2,3 or a range like 1-5"))
    seeds: str | None = _opt(None, "repeat the run over seeds: a count N (seeds --seed ... --seed+N-1) or a list "
                                   "'0,4,7'; with --folds, every fold under every seed (default: the one --seed)",
                             metavar="N|LIST",
                             limits=Limits(pattern=r"[\d,\s-]+", what="a count N, a list like 0,4,7 or a range like 0-2"))
    out_dir: str = _opt("runs/train", "run directory: checkpoints, metrics.csv, run.json, the final model",
                        flag="--out", metavar="DIR", limits=Limits(pattern=r".*\S.*", what="a directory path"))
    device: str = _opt("auto", "auto (CUDA when present), cpu, cuda or cuda:N",
                       limits=Limits(pattern=r"auto|cpu|cuda(:\d+)?", what="auto, cpu, cuda or cuda:N"))
    epochs: int | None = _opt(None, "total epochs of every stage (the recipe's constant/decay split is kept; "
                                    "default: the recipe's)", limits=Limits(ge=1))
    epochs_decay: int | None = _opt(None, "of those, the epochs of linear LR decay (default: the recipe's share)",
                                  limits=Limits(ge=0))
    stage_epochs: dict[str, int] = _opt(factory=dict, help="total epochs per stage name (teacher, student, main, "
                                        "pretrain); beats epochs for the stages it names", flag=None,
                                        limits=Limits(ge=1, each=True))
    batch_size: int | None = _opt(None, "batch size of every stage (default: the recipe's)", limits=Limits(ge=1))
    lr: float | None = _opt(None, "learning rate of every stage (default: the recipe's)", limits=Limits(gt=0))
    noise_steps: int = _opt(100, "NMER noise scheduler intensity T: the diffusion steps the noise level is drawn "
                                 "from", limits=Limits(ge=1))
    corruption: str | None = _opt(None, "how missing modalities are presented: zeroed or noised (default: the "
                                        "recipe's: zeros, Gaussian noise for NMER)", choices=CORRUPTIONS,
                                    limits=Limits(choices=CORRUPTIONS))
    num_workers: int = _opt(0, "DataLoader worker processes", limits=Limits(ge=0))
    progress: bool = _opt(True, "show progress bars")
    resume: bool = _opt(True, "resume from the checkpoints in the run directory (--no-resume: retrain afresh)")
    keep_checkpoints: int = _opt(1, "epoch checkpoints kept per stage besides the best one (-1: all); a "
                                    "finished stage drops its optimizer state", metavar="N",
                                 limits=Limits(ge=-1))
    tensorboard: bool = _opt(True, "also log the per-epoch metrics to RUN/tensorboard when tensorboard is "
                                   "installed (pip install 'mmer_ext[tensorboard]')")
    hparams: dict[str, Any] = _opt(factory=dict, help="per-stage constructor arguments of the model, e.g. "
                                   "hparams.student.cycle_weight=1", flag=None)
    missing_rate: float = _opt(0.1, "imder: missing rate MR of the missing-data stage, one of 0.0 ... 0.7",
                               limits=MR_LIMITS)
    missing_protocol: str = _opt("per-sample", "imder: each sample its own missing pattern (per-sample) or the "
                                               "authors' whole-batch patterns (per-batch)", choices=MISSING_PROTOCOLS,
                                 limits=Limits(choices=MISSING_PROTOCOLS))
    eval_missing_rates: list[float] = _opt(factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
                                           help="imder: the missing rates the test split is evaluated at",
                                           metavar="MR", limits=Limits(choices=MR_LIMITS.choices, what=MR_LIMITS.what,
                                                                       each=True))
    sampler: str | None = _opt(None, "imder: the recovery sampler -- em (Euler-Maruyama, the authors'), pc "
                                     "(predictor-corrector), ode (probability-flow Euler), ode-heun, ddim "
                                     "(default: the recipe's em)", choices=SAMPLER_NAMES,
                                 limits=Limits(choices=SAMPLER_NAMES))
    sampler_steps: int | None = _opt(None, "imder: sampler steps (default: the recipe's 100)", flag="--steps",
                                     limits=Limits(ge=1))
    sampler_eta: float | None = _opt(None, "imder, ddim only: the share of the ancestral noise per step, 0 "
                                           "(deterministic) to 1 (default 0; the recovery benchmark's few-step "
                                           "sampler is --sampler ddim --steps 10 --eta 0.5)", flag="--eta",
                                     limits=Limits(ge=0.0, le=1.0))


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            with path.open("rb") as f:
                return tomllib.load(f)
        if suffix in (".yaml", ".yml"):
            loaded = OmegaConf.to_container(OmegaConf.load(path))
            if loaded is None:
                return {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
            return loaded
    except (tomllib.TOMLDecodeError, OmegaConfBaseException, ValueError, yaml.YAMLError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config file {str(path)!r} is not valid {suffix[1:].upper()}: {e}") from e
    raise ConfigError(f"config file {str(path)!r}: unknown format {suffix!r} (use .yaml, .yml or .toml)")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), **fields: Any) -> TrainConfig:
    """Defaults, then the file at ``path``, then ``fields`` (from command-line flags), then ``key=value`` overrides."""
    schema = OmegaConf.structured(TrainConfig)
    try:
        merged = schema
        if path is not None:
            merged = OmegaConf.merge(merged, _read_file(Path(path)))
        set_fields = {k: v for k, v in fields.items() if v is not None}
        if set_fields:
            merged = OmegaConf.merge(merged, set_fields)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg: TrainConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad configuration: {e}") from e
    return validate(cfg)


def _check_value(name: str, value: Any, limits: Limits) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    if limits.choices is not None:
        ok = any(abs(value - c) < 1e-9 if isinstance(value, float) and isinstance(c, float) else value == c
                 for c in limits.choices)
        if not ok:
            shown = ", ".join(str(c) for c in limits.choices)
            raise ConfigError(f"{name} {value!r} is not one of {limits.what + ' ' if limits.what else ''}{shown}")
    if limits.pattern is not None and not (isinstance(value, str) and re.fullmatch(limits.pattern, value)):
        raise ConfigError(f"{name} {value!r} must be {limits.what or f'of the form {limits.pattern}'}")
    if isinstance(value, (int, float)):
        if limits.gt is not None and not value > limits.gt:
            raise ConfigError(f"{name} must be {'positive' if limits.gt == 0 else f'greater than {limits.gt}'}, "
                              f"got {value}")
        if limits.ge is not None and not value >= limits.ge:
            raise ConfigError(f"{name} must be {'>= 0' if limits.ge == 0 else f'at least {limits.ge}'}, got {value}")
        if limits.le is not None and not value <= limits.le:
            raise ConfigError(f"{name} must be at most {limits.le}, got {value}")
        if limits.lt is not None and not value < limits.lt:
            raise ConfigError(f"{name} must be less than {limits.lt}, got {value}")


def check_field(name: str, value: Any) -> Any:
    """Check one value against the limits of the :class:`TrainConfig` field ``name`` (for flags of other commands
    that mean the same thing, such as ``evaluate --fold``); returns it."""
    limits = next(f.metadata["limits"] for f in fields(TrainConfig) if f.name == name)
    for item in value if limits.each else [value]:
        _check_value(name, item, limits)
    return value


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every field against the :class:`Limits` declared next to it; raise :class:`ConfigError` naming it."""
    for f in fields(cfg):
        limits = f.metadata.get("limits")
        if limits is None:
            continue
        value = getattr(cfg, f.name)
        if limits.each:
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                _check_value(f"{f.name}.{key}" if isinstance(value, dict) else f.name, item, limits)
        else:
            _check_value(f.name, value, limits)
    for stage, given in cfg.hparams.items():
        if not isinstance(given, dict):
            raise ConfigError(f"hparams.{stage} must map constructor arguments to values (hparams.{stage}.NAME=VALUE), "
                              f"got {given!r}")
    if cfg.keep_checkpoints == 0:  # -1 means all; the declared limit admits it
        raise ConfigError(f"keep_checkpoints must be at least 1, or -1 for all, got {cfg.keep_checkpoints}")
    if not cfg.eval_missing_rates:
        raise ConfigError("eval_missing_rates must name at least one missing rate")
    if cfg.seeds is not None:
        parse_seeds(cfg.seeds, cfg.seed)
    return cfg


# --folds / --seeds are config fields, so their parsing lives here (train/cv.py runs them).
def int_list(text: str, what: str) -> list[int]:
    """``"0,4,7"`` or ``"2-4"`` (ranges inclusive, comma-separated) -> the integers, each once."""
    values: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
        if m is None:
            raise ConfigError(f"{what}: {part!r} in {text!r} is not a number or a range like 1-5")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ConfigError(f"{what}: the range {part!r} is empty")
        values.extend(range(lo, hi + 1))
    if len(set(values)) != len(values):
        raise ConfigError(f"{what}: {text!r} names a value twice")
    return values


def parse_seeds(text: str | int | None, base_seed: int = 0) -> list[int] | None:
    """``"3"`` -> three seeds ``base_seed, base_seed + 1, base_seed + 2``; ``"0,4,7"`` (or ``"0-2"``) -> those
    seeds; ``None`` -> no seed repeats."""
    if text is None:
        return None
    text = str(text).strip()
    if re.fullmatch(r"\d+", text):
        n = int(text)
        if n < 1:
            raise ConfigError(f"seeds: a count must be at least 1, got {n}")
        return [base_seed + i for i in range(n)]
    return int_list(text, "seeds")


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))
