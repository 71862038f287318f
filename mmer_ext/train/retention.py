"""Which checkpoint files a stage keeps: the newest ``keep`` epochs' weights, the best weights, and the training
state of the newest epoch only while the stage runs (resuming needs nothing else).

Disk is what this saves: the optimizer state of Adam is twice the weights, and the best epoch is usually one of the
newest, so ``best.safetensors`` is a hard link to that epoch's file instead of a second copy where the file system
allows it.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

from mmer_ext._atomic import atomic_write_bytes

__all__ = ["epoch_name", "link_or_copy", "prune_epochs", "drop_states"]

_EPOCH_FILE = re.compile(r"epoch-(\d+)\.(safetensors|state\.pt)")


def epoch_name(epoch: int) -> str:
    return f"epoch-{epoch:03d}"


def link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src``, atomically: a hard link where possible, else a copy.

    The link is made under a temporary name and renamed over ``dst``, so a reader sees the old ``dst`` or the new
    one. A later atomic write of either name replaces that name's inode and leaves the other file as it was.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        os.link(src, tmp)
    except OSError:  # no hard links on this file system (some network and FUSE mounts)
        atomic_write_bytes(dst, src.read_bytes())
        return
    try:
        os.replace(tmp, dst)
    finally:
        # rename() of two links to one file does nothing and leaves the temporary name behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _epoch_files(stage_dir: Path) -> list[tuple[int, str, Path]]:
    found = []
    for path in stage_dir.iterdir():
        m = _EPOCH_FILE.fullmatch(path.name)
        if m:
            found.append((int(m.group(1)), m.group(2), path))
    return found


def prune_epochs(stage_dir: Path, keep: int, current_epoch: int) -> None:
    """After ``current_epoch`` (1-based) is written and ``latest.json`` points at it: delete the weights of all but
    the newest ``keep`` epochs (-1: keep all), every training state but the current one, and any epoch file past
    ``current_epoch`` (left by an earlier run of this directory that trained further; this run will rewrite it)."""
    files = _epoch_files(stage_dir)
    kept_weights = sorted((e for e, kind, _ in files if kind == "safetensors" and e <= current_epoch), reverse=True)
    if keep >= 0:
        kept_weights = kept_weights[:keep]
    for epoch, kind, path in files:
        stale = epoch > current_epoch
        if stale or (kind == "state.pt" and epoch != current_epoch) or (kind == "safetensors" and epoch not in
                                                                        kept_weights):
            path.unlink(missing_ok=True)


def drop_states(stage_dir: Path) -> None:
    """A finished stage is never resumed (``done.json`` says so), so its optimizer states are dead weight."""
    for _epoch, kind, path in _epoch_files(stage_dir):
        if kind == "state.pt":
            path.unlink(missing_ok=True)
