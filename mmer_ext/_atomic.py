"""Atomic file writes: a temporary file in the destination's directory, fsynced, then ``os.replace``d over it.

Every file mmer_ext writes for a user (checkpoints, datasets, converted data, reports) goes through here, so a
crash or a full disk at any instant leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text"]

PathLike = str | os.PathLike


def _current_umask() -> int:
    # os.umask can only be read by setting it; done once at import, before any threads of ours exist.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_open(
    path: PathLike, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None
) -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; on success move it over ``path`` atomically.

    Parameters
    ----------
    path : str or PathLike
        Destination. Its parent directories are created if needed.
    mode : {"w", "wb"}
        Text or binary.
    encoding, newline
        As for :func:`open`, text mode only.

    Notes
    -----
    The temporary file lives in the destination's directory so that ``os.replace`` is a same-filesystem rename
    (atomic on POSIX and Windows). Its data is flushed and fsynced before the rename, so a crash right after cannot
    expose an empty file. If the body of the ``with`` block raises, the temporary file is deleted and ``path`` keeps
    its previous content. The new file gets the old file's permission bits, or ``0o666 & ~umask`` for a new file
    (``mkstemp`` would otherwise leave it private, ``0o600``).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports modes 'w' and 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if "b" in mode:
            fh = os.fdopen(fd, mode)
        else:
            fh = os.fdopen(fd, mode, encoding=encoding, newline=newline)
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        try:
            perms = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            perms = 0o666 & ~_UMASK
        os.chmod(tmp_name, perms)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`); returns the path."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`); returns the path."""
    with atomic_open(path, "w", encoding=encoding) as fh:
        fh.write(text)
    return Path(path)
