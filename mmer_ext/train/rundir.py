"""A run directory stays the user's: its location is checked before anything is written, the paths its pointer files
name never leave it, and one training at a time holds it (an advisory ``flock`` on the directory).

The lock is released by the kernel when its holder exits, however it exits, so a killed run never leaves a stale
lock behind; ``<out>/.lock`` says who took it last (pid, host, start time), which is what a second training on the
same directory reports.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from mmer_ext.train.checkpoint import CheckpointError
from mmer_ext.train.config import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, run directories are not guarded
    fcntl = None

__all__ = ["LOCK_NAME", "RunDirectoryBusy", "check_out_dir", "inside", "run_lock", "stamp_lock"]

LOCK_NAME = ".lock"


class RunDirectoryBusy(ConfigError):
    """Another training holds the run directory."""


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """Fail before any work when ``out_dir`` cannot be a run directory: an existing file, a path under a file, a
    location without write permission. A full disk can only show while writing (the CLI reports it then)."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {str(path)!r} is an existing file, not a directory; choose another --out")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"--out {str(path)!r} lies under {str(existing)!r}, which is a file; choose another --out")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {str(path)!r}: cannot write to {str(existing)!r} (permission denied or read-only "
                          "file system); choose a writable --out")
    return path


def inside(directory: str | os.PathLike, name: object, what: str) -> Path:
    """``directory / name`` for a ``name`` read from a pointer file, refused unless it resolves (symbolic links
    followed) to a file inside ``directory``: the trainer deletes superseded files by these names."""
    directory = Path(directory)
    if not isinstance(name, str) or not name or os.path.isabs(name):
        raise CheckpointError(f"{what}: {name!r} is not a file name inside {str(directory)!r}; delete the pointer "
                              "file or train with --no-resume")
    base = directory.resolve()
    target = (directory / name).resolve()
    if target.parent != base:
        raise CheckpointError(f"{what}: {name!r} resolves to {str(target)!r}, outside the run directory "
                              f"{str(base)!r}; refusing to read or delete it (delete the pointer file or train with "
                              "--no-resume)")
    return directory / target.name


def _holder(lock_path: Path) -> str:
    try:
        info = json.loads(lock_path.read_text())
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def run_lock(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on ``out_dir`` for the body; raise :class:`RunDirectoryBusy` naming the holder if
    another process holds it. The lock is taken on the directory itself; once it is ours, ``<out_dir>/.lock`` says who
    holds it. (The trainer checks everything it can before, so a refused run writes nothing.)"""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield out_dir / LOCK_NAME
        return
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirectoryBusy(f"--out {str(out_dir)!r} is in use by another training "
                                   f"({_holder(out_dir / LOCK_NAME)}); wait for it to finish or train into another "
                                   "--out") from None
        stamp_lock(out_dir / LOCK_NAME)
        yield out_dir / LOCK_NAME
    finally:
        os.close(fd)  # closing the descriptor releases the flock, as does the process's death


def stamp_lock(lock_path: Path) -> None:
    """Say who holds the lock (pid, host, start time), for a second training to report."""
    from mmer_ext._atomic import atomic_write_text

    atomic_write_text(lock_path, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
