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


def _opt(default: Any = None, help: str = "", *, factory: Any = None, **cli: Any) -> Any:
    """A config field with its command-line help (``metadata["help"]``) and flag settings (``metadata["cli"]``:
    ``flag`` renames it, ``choices`` limits it, ``flag=None`` leaves it to ``--set`` and config files)."""
    metadata = {"help": help, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything ``mmer-ext train`` can set. The command line's flags and their help are generated from these
    fields (:mod:`mmer_ext.cli.train`); a field left at ``None`` keeps the recipe's value."""

    model: str = _opt("mmin", "the recipe to train; mmin, ifmmin and nmer train a teacher, then a student",
                      choices=MODELS)
    data: str = _opt("synthetic", "data source, one of the forms listed under 'data sources' (mmer_ext.data.specs)",
                     metavar="SPEC")
    data_options: dict[str, Any] = _opt(
        factory=dict, help="extra keyword arguments of the data source (the synthetic set's preset and sizes, "
        "norm_method of the real features, ...)", flag=None)
    fold: int = _opt(1, "cross-validation fold of the real utterance data, 1-based")
    seed: int = _opt(0, "seeds the weights, the data order, the missing conditions and the synthetic data")
    folds: str | None = _opt(None, "cross-validation: 'all' (every fold of the iemocap: / msp: layout, 10 / 12), a "
                                   "list '1,2,3' or a range '1-5'; each fold trains in its own subdirectory of --out "
                                   "and the results are aggregated as mean ± std (default: the one --fold)",
                             metavar="all|LIST")
    seeds: str | None = _opt(None, "repeat the run over seeds: a count N (seeds --seed ... --seed+N-1) or a list "
                                   "'0,4,7'; with --folds, every fold under every seed (default: the one --seed)",
                             metavar="N|LIST")
    out_dir: str = _opt("runs/train", "run directory: checkpoints, metrics.csv, run.json, the final model",
                        flag="--out", metavar="DIR")
    device: str = _opt("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    epochs: int | None = _opt(None, "total epochs of every stage (the recipe's constant/decay split is kept; "
                                    "default: the recipe's)")
    epochs_decay: int | None = _opt(None, "of those, the epochs of linear LR decay (default: the recipe's share)")
    stage_epochs: dict[str, int] = _opt(factory=dict, help="total epochs per stage name (teacher, student, main, "
                                        "pretrain); beats epochs for the stages it names", flag=None)
    batch_size: int | None = _opt(None, "batch size of every stage (default: the recipe's)")
    lr: float | None = _opt(None, "learning rate of every stage (default: the recipe's)")
    noise_steps: int = _opt(100, "NMER noise scheduler intensity T: the diffusion steps the noise level is drawn "
                                 "from")
    corruption: str | None = _opt(None, "how missing modalities are presented: zeroed or noised (default: the "
                                        "recipe's: zeros, Gaussian noise for NMER)", choices=CORRUPTIONS)
    num_workers: int = _opt(0, "DataLoader worker processes")
    progress: bool = _opt(True, "show progress bars")
    resume: bool = _opt(True, "resume from the checkpoints in the run directory (--no-resume: retrain afresh)")
    keep_checkpoints: int = _opt(1, "epoch checkpoints kept per stage besides the best one (-1: all); a "
                                    "finished stage drops its optimizer state", metavar="N")
    tensorboard: bool = _opt(True, "also log the per-epoch metrics to RUN/tensorboard when tensorboard is "
                                   "installed (pip install 'mmer_ext[tensorboard]')")
    hparams: dict[str, Any] = _opt(factory=dict, help="per-stage constructor arguments of the model, e.g. "
                                   "hparams.student.cycle_weight=1", flag=None)
    missing_rate: float = _opt(0.1, "imder: missing rate MR of the missing-data stage, one of 0.0 ... 0.7")
    missing_protocol: str = _opt("per-sample", "imder: each sample its own missing pattern (per-sample) or the "
                                               "authors' whole-batch patterns (per-batch)", choices=MISSING_PROTOCOLS)
    eval_missing_rates: list[float] = _opt(factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
                                           help="imder: the missing rates the test split is evaluated at",
                                           metavar="MR")
    sampler: str | None = _opt(None, "imder: the recovery sampler -- em (Euler-Maruyama, the authors'), pc "
                                     "(predictor-corrector), ode (probability-flow Euler), ode-heun, ddim "
                                     "(default: the recipe's em)", choices=SAMPLER_NAMES)
    sampler_steps: int | None = _opt(None, "imder: sampler steps (default: the recipe's 100)", flag="--steps")


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
    if cfg.keep_checkpoints < 1 and cfg.keep_checkpoints != -1:
        raise ConfigError(f"keep_checkpoints must be at least 1, or -1 for all, got {cfg.keep_checkpoints}")
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
    if cfg.seeds is not None:
        from mmer_ext.train.cv import parse_seeds

        parse_seeds(cfg.seeds, cfg.seed)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))
