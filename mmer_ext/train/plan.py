"""The plan of a run, printed before training starts: stages, epochs, data sizes, optimizer steps, outputs.

A newcomer who types ``mmer-ext train`` gets the recipe's full length on IEMOCAP-sized data; the plan says so before
the first step, and the per-epoch lines then give the time per epoch and what is left.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mmer_ext.models.recipes import Stage
from mmer_ext.train.config import TrainConfig
from mmer_ext.train.views import STAGE_DATA_MODES, views_for

__all__ = ["make_plan", "format_plan", "steps_per_epoch"]

# Above this many optimizer steps at the recipe's own length the plan suggests a shorter first try.
LONG_RUN_STEPS = 1000


def steps_per_epoch(n_items: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps of one epoch: DistributedSampler pads every rank to ``ceil(n / world)`` items, each rank
    takes ``batch_size // world`` of them per step, the last batch may be short."""
    per_rank = math.ceil(n_items / world_size)
    return math.ceil(per_rank / max(batch_size // world_size, 1))


def _stage_status(stage_dir: Path) -> str | None:
    if (stage_dir / "done.json").is_file():
        return "already trained: loaded, not retrained"
    latest = stage_dir / "latest.json"
    if latest.is_file():
        try:
            return f"resumes after epoch {int(json.loads(latest.read_text())['epoch'])}"
        except (ValueError, KeyError, TypeError, OSError):
            return None
    return None


def make_plan(cfg: TrainConfig, stages: tuple[Stage, ...], splits: dict[str, Any], *, world_size: int = 1,
              device: Any = None, teacher_checkpoint: Any = None, tensorboard: bool = False) -> dict[str, Any]:
    train = splits["train"]
    unit = views_for(train).kind
    out_dir = Path(cfg.out_dir)
    planned = []
    for index, stage in enumerate(stages):
        total = stage.epochs + stage.epochs_decay
        n_items = len(train) * (6 if STAGE_DATA_MODES[stage.data] == "expand" else 1)
        per_epoch = steps_per_epoch(n_items, stage.batch_size, world_size)
        entry: dict[str, Any] = {
            "name": stage.name, "model": stage.model.__name__, "epochs": total, "epochs_decay": stage.epochs_decay,
            "batch_size": stage.batch_size, "lr": stage.lr, "steps_per_epoch": per_epoch, "steps": per_epoch * total,
            "early_stop": stage.early_stop, "status": None,
        }
        if index == 0 and teacher_checkpoint is not None and len(stages) > 1:
            entry.update(steps=0, status=f"loaded from {teacher_checkpoint}, not trained")
        elif cfg.resume:
            entry["status"] = _stage_status(out_dir / stage.name)
        planned.append(entry)
    plan: dict[str, Any] = {
        "model": cfg.model, "data": cfg.data, "fold": cfg.fold, "seed": cfg.seed, "device": str(device),
        "world_size": world_size, "out_dir": str(out_dir), "unit": unit,
        "sizes": {k: len(v) for k, v in splits.items()}, "dims": list(train.dims), "num_classes": train.num_classes,
        "stages": planned, "epochs": sum(s["epochs"] for s in planned), "steps": sum(s["steps"] for s in planned),
        "recipe_length": cfg.epochs is None and not cfg.stage_epochs,
        "keep_checkpoints": cfg.keep_checkpoints, "tensorboard": tensorboard,
    }
    if unit == "dialogues" and hasattr(train, "num_utterances"):
        plan["utterances"] = {k: int(v.num_utterances) for k, v in splits.items() if hasattr(v, "num_utterances")}
    return plan


def format_plan(plan: dict[str, Any]) -> list[str]:
    sizes = plan["sizes"]
    data = f"{sizes.get('train', 0)} train / {sizes.get('val', 0)} val / {sizes.get('test', 0)} test {plan['unit']}"
    if "utterances" in plan:
        u = plan["utterances"]
        data += f" ({u.get('train', 0)} / {u.get('val', 0)} / {u.get('test', 0)} utterances)"
    dims = ", ".join(f"{m} {d}" for m, d in zip("AVL", plan["dims"]))
    where = f" on {plan['device']}" + (f" x {plan['world_size']} processes" if plan["world_size"] > 1 else "")
    lines = [f"plan: {plan['model']} on {plan['data']} (fold {plan['fold']}, seed {plan['seed']}){where}",
             f"  data: {data}; dims {dims}; {plan['num_classes']} classes"]
    width = max(len(s["name"]) for s in plan["stages"])
    for s in plan["stages"]:
        line = (f"  stage {s['name'].ljust(width)}  {s['model']}: {s['epochs']} epochs"
                + (f" ({s['epochs'] - s['epochs_decay']} + {s['epochs_decay']} decay)" if s["epochs_decay"] else "")
                + f", batch {s['batch_size']}, lr {s['lr']:g}: {s['steps_per_epoch']} steps/epoch, "
                f"{s['steps_per_epoch'] * s['epochs']} steps"
                + (f" at most (early stop after {s['early_stop']} epochs without progress)" if s["early_stop"] else ""))
        if s["status"]:
            line += f" [{s['status']}]"
        lines.append(line)
    lines.append(f"  in all: {plan['epochs']} epochs, {plan['steps']} optimizer steps")
    out = plan["out_dir"]
    keep = "every epoch" if plan["keep_checkpoints"] == -1 else (
        "the last epoch" if plan["keep_checkpoints"] == 1 else f"the last {plan['keep_checkpoints']} epochs")
    logs = "metrics.csv, " + ("tensorboard/, " if plan["tensorboard"] else "")
    lines.append(f"  writes into {out}/: model.safetensors, {logs}training_curves.png, run.json; per stage the "
                 f"weights of {keep} and of the best")
    if plan["recipe_length"] and plan["steps"] > LONG_RUN_STEPS:
        small = {"utterances": "synthetic:small", "dialogues": "synthetic-dialogue:small",
                 "sequences": "synthetic-mosi:small"}[plan["unit"]]
        lines.append(f"  note: the recipe's full length ({plan['steps']} steps); each epoch line shows its time and "
                     f"what is left. For a first try: --epochs 2 --data {small}")
    return lines
