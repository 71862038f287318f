"""A run directory stays the user's: its location is checked before anything is written, the paths its pointer files
name never leave it, and one training at a time holds it (an advisory ``flock`` on ``<out>/.lock``).

The lock is released by the kernel when its holder exits, however it exits, so a killed run never leaves a stale
lock behind; the file itself stays and says who held it last (pid, host, start time), which is what a second
training on the same directory reports.
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

__all__ = ["LOCK_NAME", "RunDirectoryBusy", "check_out_dir", "inside", "run_lock"]

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
    """Hold ``<out_dir>/.lock`` for the body; raise :class:`RunDirectoryBusy` naming the holder if it is taken."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir / LOCK_NAME
    if fcntl is None:  # pragma: no cover
        yield lock_path
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirectoryBusy(f"--out {str(out_dir)!r} is in use by another training ({_holder(lock_path)}); "
                                   "wait for it to finish or train into another --out") from None
        stamp = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(stamp) + "\n").encode(), 0)
        yield lock_path
    finally:
        os.close(fd)  # closing the descriptor releases the flock
