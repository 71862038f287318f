"""Training and evaluation: the two-stage trainer, checkpoints, DDP, configs.

The names below are imported on first use (PEP 562), so ``mmer_ext.train.config`` and ``.checkpoint`` load without
the models and ops: the command line builds its parser, and reports a broken build, from them alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CheckpointError": "checkpoint",
    "load_weights": "checkpoint",
    "read_weights_metadata": "checkpoint",
    "save_weights": "checkpoint",
    "ConfigError": "config",
    "TrainConfig": "config",
    "config_to_dict": "config",
    "load_config": "config",
    "CVResult": "cv",
    "run_cv": "cv",
    "collect_embeddings": "evaluation",
    "evaluate_model": "evaluation",
    "predict": "evaluation",
    "FitResult": "trainer",
    "fit": "trainer",
    "load_model": "trainer",
    "resolve_stages": "trainer",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from mmer_ext.train.checkpoint import CheckpointError, load_weights, read_weights_metadata, save_weights
    from mmer_ext.train.config import ConfigError, TrainConfig, config_to_dict, load_config
    from mmer_ext.train.cv import CVResult, run_cv
    from mmer_ext.train.evaluation import collect_embeddings, evaluate_model, predict
    from mmer_ext.train.trainer import FitResult, fit, load_model, resolve_stages


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmer_ext.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mmer_ext.train.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
