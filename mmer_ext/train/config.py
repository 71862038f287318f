"""Training configuration: defaults, a YAML or TOML file, then ``key=value`` overrides, validated by OmegaConf.

The recipe of a model (:data:`mmer_ext.models.recipes.RECIPES`) holds the paper's hyper-parameters; a field left at
``None`` here keeps the recipe's value, so a config file only names what it changes.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ["TrainConfig", "ConfigError", "Limits", "check_field", "load_config", "config_to_dict", "validate"]

MODELS = ("baseline", "augmented", "mmin", "ifmmin", "nmer", "mmgcn", "mmgcn-meld", "imder", "imder-mosei")
CORRUPTIONS = ("zero", "gaussian", "impulse")
# Score-based recovery samplers of IMDer (mmer_ext.sampling.SAMPLERS).
SAMPLER_NAMES = ("em", "pc", "ode", "ode-heun", "ddim")
MISSING_PROTOCOLS = ("per-sample", "per-batch")


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


def _limited(default: Any = MISSING, *, default_factory: Any = MISSING, metadata: dict[str, Any] | None = None,
             **limits: Any) -> Any:
    """A dataclass field whose ``metadata["limits"]`` holds its :class:`Limits` (other metadata, such as help text,
    passes through)."""
    return field(default=default, default_factory=default_factory,
                 metadata={**(metadata or {}), "limits": Limits(**limits)})


def _missing_rate_choices() -> tuple[float, ...]:
    from mmer_ext.data.protocols import MISSING_RATES

    return tuple(MISSING_RATES)


# torch.manual_seed takes 64-bit seeds and the trainer mixes them modulo 2**63 - 1: beyond that two seeds would alias.
MAX_SEED = 2**63 - 2


@dataclass
class TrainConfig:
    model: str = _limited("mmin", choices=MODELS)
    # "synthetic", "synthetic:small", "iemocap:PATH", "msp:PATH"; for mmgcn "synthetic-dialogue",
    # "iemocap-erc:PATH", "meld:PATH" or "dialogues:DIR" (see mmer_ext.data.load_dataset).
    data: str = _limited("synthetic", pattern=r".+", what="a data source such as synthetic or iemocap:PATH")
    # Extra keyword arguments of the data source (sizes of the synthetic set, norm_method of the real one, ...).
    data_options: dict[str, Any] = field(default_factory=dict)
    fold: int = _limited(1, ge=1)
    seed: int = _limited(0, ge=0, le=MAX_SEED)
    out_dir: str = _limited("runs/train", pattern=r".*\S.*", what="a directory path")
    device: str = _limited("auto", pattern=r"auto|cpu|cuda(:\d+)?", what="auto, cpu, cuda or cuda:N")
    # None keeps the recipe's value; for a two-stage model they apply to every stage.
    epochs: int | None = _limited(None, ge=1)
    epochs_decay: int | None = _limited(None, ge=0)
    # Total epochs per stage name ("teacher", "student", "main"); beats `epochs` for the stages it names.
    stage_epochs: dict[str, int] = _limited(default_factory=dict, ge=1, each=True)
    batch_size: int | None = _limited(None, ge=1)
    lr: float | None = _limited(None, gt=0)
    # The NMER noise scheduler's intensity T (the number of diffusion steps the noise level is drawn from).
    noise_steps: int = _limited(100, ge=1)
    # How missing modalities are corrupted; None keeps the recipe's choice (zeros, or NMER's Gaussian noise).
    corruption: str | None = _limited(None, choices=CORRUPTIONS)
    num_workers: int = _limited(0, ge=0)
    progress: bool = True
    # Write a resumable checkpoint every epoch and pick it up when the same out_dir is trained again.
    resume: bool = True
    # Per-stage overrides of the model's constructor arguments, e.g. {"student": {"cycle_weight": 1.0}}.
    hparams: dict[str, Any] = field(default_factory=dict)
    # IMDer (sequence data): the missing rate MR of the missing-data stage, and how missingness is drawn --
    # "per-sample" (each sample its own pattern) or "per-batch" (the authors': whole batches share one pattern).
    missing_rate: float = _limited(0.1, choices=_missing_rate_choices(), what="IMDer's missing rates")
    missing_protocol: str = _limited("per-sample", choices=MISSING_PROTOCOLS)
    # The MRs the test split is evaluated at (IMDer's sweep).
    eval_missing_rates: list[float] = _limited(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
                                               choices=_missing_rate_choices(), what="IMDer's missing rates", each=True)
    # IMDer's recovery sampler and its number of steps (None keeps the recipe's: 100-step Euler-Maruyama).
    sampler: str | None = _limited(None, choices=SAMPLER_NAMES)
    sampler_steps: int | None = _limited(None, ge=1)


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
    if not cfg.eval_missing_rates:
        raise ConfigError("eval_missing_rates must name at least one missing rate")
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))
