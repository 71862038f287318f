"""Training configuration: defaults, a YAML or TOML file, then ``key=value`` overrides, validated by OmegaConf.

The recipe of a model (:data:`mmer_ext.models.recipes.RECIPES`) holds the paper's hyper-parameters; a field left at
``None`` here keeps the recipe's value, so a config file only names what it changes.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ["TrainConfig", "ConfigError", "load_config", "config_to_dict"]

MODELS = ("baseline", "augmented", "mmin", "ifmmin", "nmer", "mmgcn", "mmgcn-meld", "imder", "imder-mosei",
          "imder-authors")
CORRUPTIONS = ("zero", "gaussian", "impulse")
# Score-based recovery samplers of IMDer (mmer_ext.sampling.SAMPLERS).
SAMPLER_NAMES = ("em", "pc", "ode", "ode-heun", "ddim")
MISSING_PROTOCOLS = ("per-sample", "per-batch")


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the key."""


@dataclass
class TrainConfig:
    model: str = "mmin"
    # "synthetic", "synthetic:small", "iemocap:PATH", "msp:PATH"; for mmgcn "synthetic-dialogue",
    # "iemocap-erc:PATH", "meld:PATH" or "dialogues:DIR" (see mmer_ext.data.load_dataset).
    data: str = "synthetic"
    # Extra keyword arguments of the data source (sizes of the synthetic set, norm_method of the real one, ...).
    data_options: dict[str, Any] = field(default_factory=dict)
    fold: int = 1
    seed: int = 0
    out_dir: str = "runs/train"
    device: str = "auto"
    # None keeps the recipe's value; for a two-stage model they apply to every stage.
    epochs: int | None = None
    epochs_decay: int | None = None
    # Total epochs per stage name ("teacher", "student", "main"); beats `epochs` for the stages it names.
    stage_epochs: dict[str, int] = field(default_factory=dict)
    batch_size: int | None = None
    lr: float | None = None
    # The NMER noise scheduler's intensity T (the number of diffusion steps the noise level is drawn from).
    noise_steps: int = 100
    # How missing modalities are corrupted; None keeps the recipe's choice (zeros, or NMER's Gaussian noise).
    corruption: str | None = None
    num_workers: int = 0
    progress: bool = True
    # Write a resumable checkpoint every epoch and pick it up when the same out_dir is trained again.
    resume: bool = True
    # Per-stage overrides of the model's constructor arguments, e.g. {"student": {"cycle_weight": 1.0}}.
    hparams: dict[str, Any] = field(default_factory=dict)
    # IMDer (sequence data): the missing rate MR of the missing-data stage, and how missingness is drawn --
    # "per-sample" (each sample its own pattern) or "per-batch" (the authors': whole batches share one pattern).
    missing_rate: float = 0.1
    missing_protocol: str = "per-sample"
    # The MRs the test split is evaluated at (IMDer's sweep).
    eval_missing_rates: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    # IMDer's recovery sampler and its number of steps (None keeps the recipe's: 100-step Euler-Maruyama).
    sampler: str | None = None
    sampler_steps: int | None = None


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
    except (tomllib.TOMLDecodeError, OmegaConfBaseException, ValueError) as e:
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
    _validate(cfg)
    return cfg


def _validate(cfg: TrainConfig) -> None:
    if cfg.model not in MODELS:
        raise ConfigError(f"model {cfg.model!r} is not one of {', '.join(MODELS)}")
    if cfg.corruption is not None and cfg.corruption not in CORRUPTIONS:
        raise ConfigError(f"corruption {cfg.corruption!r} is not one of {', '.join(CORRUPTIONS)}")
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
        raise ConfigError(f"device {cfg.device!r} must be auto, cpu, cuda or cuda:N")
    for name in ("epochs", "batch_size"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    for stage, value in cfg.stage_epochs.items():
        if value < 1:
            raise ConfigError(f"stage_epochs.{stage} must be at least 1, got {value}")
    if cfg.epochs_decay is not None and cfg.epochs_decay < 0:
        raise ConfigError(f"epochs_decay must be >= 0, got {cfg.epochs_decay}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise ConfigError(f"lr must be positive, got {cfg.lr}")
    if cfg.noise_steps < 1:
        raise ConfigError(f"noise_steps must be at least 1, got {cfg.noise_steps}")
    if cfg.sampler is not None and cfg.sampler not in SAMPLER_NAMES:
        raise ConfigError(f"sampler {cfg.sampler!r} is not one of {', '.join(SAMPLER_NAMES)}")
    if cfg.sampler_steps is not None and cfg.sampler_steps < 1:
        raise ConfigError(f"sampler_steps must be at least 1, got {cfg.sampler_steps}")
    if cfg.missing_protocol not in MISSING_PROTOCOLS:
        raise ConfigError(f"missing_protocol {cfg.missing_protocol!r} is not one of {', '.join(MISSING_PROTOCOLS)}")
    from mmer_ext.data.protocols import MISSING_RATES

    for name, rates in (("missing_rate", [cfg.missing_rate]), ("eval_missing_rates", cfg.eval_missing_rates)):
        for mr in rates:
            if not any(abs(mr - r) < 1e-9 for r in MISSING_RATES):
                raise ConfigError(f"{name}: {mr} is not one of IMDer's missing rates {list(MISSING_RATES)}")
    if cfg.fold < 1:
        raise ConfigError(f"fold must be at least 1, got {cfg.fold}")


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))
