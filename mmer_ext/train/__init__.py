"""Training and evaluation: the two-stage trainer, checkpoints, DDP, configs."""

from mmer_ext.train.checkpoint import CheckpointError, load_weights, read_weights_metadata, save_weights
from mmer_ext.train.config import ConfigError, TrainConfig, config_to_dict, load_config
from mmer_ext.train.evaluation import collect_embeddings, evaluate_model, predict
from mmer_ext.train.trainer import FitResult, fit, load_model, resolve_stages

__all__ = [
    "CheckpointError",
    "ConfigError",
    "FitResult",
    "TrainConfig",
    "collect_embeddings",
    "config_to_dict",
    "evaluate_model",
    "fit",
    "load_config",
    "load_model",
    "load_weights",
    "predict",
    "read_weights_metadata",
    "resolve_stages",
    "save_weights",
]
