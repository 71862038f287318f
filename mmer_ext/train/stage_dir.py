"""One stage's directory: its fingerprint, per-epoch checkpoints, exact resumption and the end-of-stage record.

Layout (see ``train/trainer.py`` for the whole run directory)::

    <stage>/stage.json           what the checkpoints depend on; resuming under other settings is refused
    <stage>/latest.json          points at the newest complete (weights, state) pair
    <stage>/epoch-NNN.safetensors, epoch-NNN.state.pt, best.safetensors, done.json
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmer_ext.models.recipes import Stage
from mmer_ext.train.checkpoint import CheckpointError, atomic_write_bytes, load_state, load_weights, save_state, save_weights
from mmer_ext.train.config import ConfigError, TrainConfig
from mmer_ext.train.distributed import DistContext
from mmer_ext.train.optim import StageOptimizer
from mmer_ext.train.retention import drop_states, epoch_name, link_or_copy, prune_epochs
from mmer_ext.train.rundir import inside
from mmer_ext.train.stage_data import stage_missing_rate

__all__ = ["write_json", "read_json", "stage_fingerprint", "claim_stage_dir", "check_stage_dir", "stage_done",
           "latest_pointer", "StageProgress", "resume_progress", "save_epoch", "finish_stage"]


def write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, default=str) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e}); delete it or train with --no-resume") from e


def stage_fingerprint(cfg: TrainConfig, stage: Stage) -> dict[str, Any]:
    """What a stage's checkpoints depend on: resuming under anything else would silently mix two runs."""
    fields = {k: v for k, v in asdict(stage).items() if k != "model"}
    return json.loads(json.dumps({
        "recipe": cfg.model, "model": stage.model.__name__, **fields,
        "data": cfg.data, "data_options": cfg.data_options, "fold": cfg.fold, "seed": cfg.seed,
        "noise_steps": cfg.noise_steps, "missing_rate": stage_missing_rate(cfg, stage),
        "missing_protocol": cfg.missing_protocol,
    }, default=str))


def claim_stage_dir(stage_dir: Path, fingerprint: dict[str, Any], resume: bool, ctx: DistContext) -> None:
    """Refuse to resume a stage trained under another configuration; forget old progress when not resuming."""
    path = stage_dir / "stage.json"
    check_stage_dir(stage_dir, fingerprint, resume)
    if ctx.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            # The pointers go; the files they name are overwritten as the new run reaches them.
            for name in ("latest.json", "done.json"):
                (stage_dir / name).unlink(missing_ok=True)
        write_json(path, fingerprint)
    ctx.barrier()


def check_stage_dir(stage_dir: Path, fingerprint: dict[str, Any], resume: bool) -> None:
    path = stage_dir / "stage.json"
    if resume and path.is_file():
        old = read_json(path)
        if not isinstance(old, dict):
            raise CheckpointError(f"{str(path)!r} must hold a JSON object; delete it or train with --no-resume")
        changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if changed:
            raise ConfigError(
                f"{stage_dir} holds a stage trained with other settings ({', '.join(changed)}); "
                "train into another --out, or pass --no-resume to start this stage afresh"
            )


def stage_done(stage_dir: Path) -> dict[str, Any] | None:
    done = stage_dir / "done.json"
    return read_json(done) if done.is_file() else None


def latest_pointer(latest: Path) -> dict[str, Path]:
    """The (weights, state) files ``latest.json`` names, each resolved inside its stage directory."""
    pointer = read_json(latest)
    if not isinstance(pointer, dict) or not isinstance(pointer.get("epoch"), int):
        raise CheckpointError(f"{str(latest)!r} must hold a JSON object with weights, state and epoch; delete it or "
                              "train with --no-resume")
    return {key: inside(latest.parent, pointer.get(key), f"{latest} key {key!r}") for key in ("weights", "state")}


@dataclass
class StageProgress:
    """Where a stage stands after an epoch: what resumption restores besides the weights and optimiser."""

    first_epoch: int
    best_metric: float
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val: dict[str, Any] = field(default_factory=dict)


def resume_progress(stage_dir: Path, model: torch.nn.Module, opt: StageOptimizer, worst: float) -> StageProgress | None:
    """Load the newest complete epoch of ``stage_dir`` into ``model`` and ``opt``; None when there is none."""
    latest = stage_dir / "latest.json"
    if not latest.is_file():
        return None
    pointer = latest_pointer(latest)
    load_weights(pointer["weights"], model)
    state = load_state(pointer["state"])
    opt.optimizer.load_state_dict(state["optimizer"])
    opt.lr_scheduler.load_state_dict(state["lr_scheduler"])
    return StageProgress(int(state["epoch"]) + 1, float(state["best_metric"]), int(state["best_epoch"]),
                         json.loads(state["history"]), json.loads(state["best_val"]))


def save_epoch(stage_dir: Path, epoch: int, model: torch.nn.Module, opt: StageOptimizer, progress: StageProgress, *,
               metadata: dict[str, Any], val: dict[str, Any] | None, improved: bool, keep: int) -> None:
    """Epoch ``epoch`` (0-based) as a (weights, state) pair, then ``latest.json`` pointing at it: a kill at any moment
    leaves the previous pair intact and named."""
    name = epoch_name(epoch + 1)
    save_weights(stage_dir / f"{name}.safetensors", model, {**metadata, "epoch": epoch + 1, "val": val})
    if improved:
        link_or_copy(stage_dir / f"{name}.safetensors", stage_dir / "best.safetensors")
    save_state(stage_dir / f"{name}.state.pt", {
        "optimizer": opt.optimizer.state_dict(),
        "lr_scheduler": opt.lr_scheduler.state_dict(),
        "epoch": epoch,
        "best_metric": progress.best_metric,
        "best_epoch": progress.best_epoch,
        "history": json.dumps(progress.history),
        "best_val": json.dumps(progress.best_val),
    })
    write_json(stage_dir / "latest.json", {"weights": f"{name}.safetensors", "state": f"{name}.state.pt",
                                           "epoch": epoch + 1})
    prune_epochs(stage_dir, keep, epoch + 1)


def finish_stage(stage_dir: Path, progress: StageProgress) -> None:
    """``done.json`` (the stage is complete; a resumed run skips it) and the optimiser states dropped."""
    write_json(stage_dir / "done.json", {"best_epoch": progress.best_epoch, "best_metric": progress.best_metric,
                                         "val": progress.best_val, "history": progress.history})
    drop_states(stage_dir)
