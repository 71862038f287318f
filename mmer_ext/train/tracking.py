"""What a run leaves for the person tracking it: per-epoch metrics (``metrics.csv``, TensorBoard when installed),
training curves (``training_curves.png``) and the environment that produced it (``run.json``).

The CSV is rewritten whole, atomically, from the stage histories the checkpoints carry, after every epoch. A resumed
run restores those histories from its last checkpoint, so the file holds exactly one row per trained epoch: an epoch
that was logged but not checkpointed before a kill is redone and its row replaced, never duplicated or lost.
TensorBoard's event files can only be appended to; each stage gets its own directory, reopened with ``purge_step``
1, which hides everything logged before, and the restored history is logged again, so the events too hold one value
per trained epoch.
"""

from __future__ import annotations

import contextlib
import csv
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from mmer_ext._atomic import atomic_open

__all__ = ["RunTracker", "flatten_record", "git_commit", "run_environment"]

METRICS_CSV = "metrics.csv"
CURVES_PNG = "training_curves.png"


def flatten_record(stage: str, record: dict[str, Any]) -> dict[str, Any]:
    """One history record (``{"epoch", "lr", "seconds", "train": {...}, "val": {...}}``) as a flat CSV row."""
    row: dict[str, Any] = {"stage": stage, "epoch": record["epoch"]}
    for key in ("lr", "seconds"):
        if key in record:
            row[key] = record[key]
    for group in ("train", "val"):
        for name, value in (record.get(group) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[f"{group}/{name}"] = value
    return row


def _summary_writer(log_dir: Path, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def tensorboard_available() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class RunTracker:
    """Collects the stage histories of one run (main process only) and writes the CSV, TensorBoard and figure."""

    def __init__(self, out_dir: Path, *, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.histories: dict[str, list[dict[str, Any]]] = {}
        self.select: dict[str, tuple[str, str]] = {}
        self.use_tensorboard = tensorboard and tensorboard_available()
        self._writers: dict[str, Any] = {}

    def stage_started(self, stage: str, select: tuple[str, str], history: list[dict[str, Any]]) -> None:
        """``select``: (validation metric, "max" or "min"); ``history``: the records restored from a checkpoint
        (empty for a fresh stage)."""
        self.histories[stage] = list(history)
        self.select[stage] = select
        if self.use_tensorboard and stage not in self._writers:
            # Steps are 1-based epochs. Purging from step 1 hides whatever earlier processes logged for this stage
            # (epochs a killed run logged past its last checkpoint, a run replaced by --no-resume); the restored
            # history is then logged again, so the events always mirror the checkpointed history.
            writer = self._writers[stage] = _summary_writer(self.out_dir / "tensorboard" / stage, 1)
            if writer is not None:
                for record in history:
                    self._add_scalars(writer, stage, record)
                writer.flush()

    def stage_loaded(self, stage: str, select: tuple[str, str], history: list[dict[str, Any]]) -> None:
        """A stage finished by an earlier run: its rows stay in the CSV and the figure."""
        self.histories[stage] = list(history)
        self.select[stage] = select

    def epoch_end(self, stage: str, history: list[dict[str, Any]]) -> None:
        self.histories[stage] = list(history)
        self.write_csv()
        writer = self._writers.get(stage)
        if writer is not None and history:
            self._add_scalars(writer, stage, history[-1])
            writer.flush()

    @staticmethod
    def _add_scalars(writer: Any, stage: str, record: dict[str, Any]) -> None:
        row = flatten_record(stage, record)
        for key, value in row.items():
            if key not in ("stage", "epoch"):
                writer.add_scalar(key, value, global_step=row["epoch"])

    def write_csv(self) -> Path:
        rows = [flatten_record(stage, r) for stage, records in self.histories.items() for r in records]
        columns = list(dict.fromkeys(k for row in rows for k in row))
        path = self.out_dir / METRICS_CSV
        with atomic_open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns or ["stage", "epoch"])
            writer.writeheader()
            writer.writerows(rows)
        return path

    def finish(self) -> Path | None:
        """Close TensorBoard and draw the curves; returns the figure's path (None when no epoch was trained)."""
        self.close()
        if not any(self.histories.values()):
            return None
        from mmer_ext.report import plot_training_curves

        return plot_training_curves(self.out_dir / CURVES_PNG, self.histories, self.select)

    def close(self) -> None:
        for writer in self._writers.values():
            if writer is not None:
                writer.close()
        self._writers.clear()


def git_commit(path: Path | None = None) -> dict[str, Any] | None:
    """The commit of the checkout mmer_ext runs from, and whether its tracked files were modified; None when it is
    not run from a checkout (an installed wheel, no git)."""
    package = Path(__file__).resolve().parents[1] if path is None else Path(path).resolve()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        # An installed package inside some other repository (a virtualenv in a project's checkout) is not ours.
        if top / package.name != package:
            return None
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def run_environment(device: torch.device) -> dict[str, Any]:
    """Versions, build, device and command line, as ``run.json`` records them."""
    from mmer_ext.info import build_info

    info = build_info()
    env: dict[str, Any] = {
        "mmer_ext": info["mmer_ext"],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_kernels": info["cuda_kernels"],
        "cuda_arch_list": info["cuda_arch_list"],
        "torch_built_against": info["torch_built_against"],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": git_commit(),
        "device": str(device),
        # orig_argv keeps what `python -m mmer_ext` or torchrun were given; argv[0] would be __main__.py.
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "cwd": os.getcwd(),
    }
    if device.type == "cuda":
        with contextlib.suppress(Exception):
            env["device_name"] = torch.cuda.get_device_name(device)
            env["device_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env
