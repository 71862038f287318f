"""How a failed command is reported: one line naming what went wrong and what to do, and an exit code.

Exit 2: the input is the user's to fix (a flag, a config, a data file, a checkpoint); exit 1: the run failed at run
time (disk full, no permission, a numerical blow-up, anything unexpected); 130: interrupted. ``--debug`` re-raises,
so the traceback is shown.
"""

from __future__ import annotations

import errno
import sys
import warnings
from collections.abc import Callable

from mmer_ext.data import DataFormatError
from mmer_ext.train import CheckpointError, ConfigError

USER_ERRORS = (ConfigError, DataFormatError, CheckpointError, FileNotFoundError)
"""Errors that mean "fix your input": exit code 2."""

USAGE_EXIT, RUNTIME_EXIT, INTERRUPTED_EXIT = 2, 1, 130

# What to do about an operating-system error, by errno: the run directory and the data are the usual culprits.
_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space or write to another --out",
    errno.EDQUOT: "the disk quota is exhausted: free some space or write to another --out",
    errno.EACCES: "permission denied: choose a location you can write to (--out) or fix its permissions",
    errno.EPERM: "operation not permitted: choose a location you can write to (--out) or fix its permissions",
    errno.EROFS: "the file system is read-only: choose a writable --out",
    errno.EEXIST: "a file is in the way where a directory is needed: choose another --out",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another --out",
    errno.EISDIR: "a directory was given where a file is needed",
    errno.ENAMETOOLONG: "the path is too long",
}


def one_line(text: str) -> str:
    """Messages of libraries (YAML, h5py) span several lines; a report is one."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def describe(exc: BaseException) -> tuple[str, int]:
    """The one-line message and the exit code for ``exc``."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted; a train run resumes from its last checkpoint when started again", INTERRUPTED_EXIT
    if isinstance(exc, USER_ERRORS[:3]):
        return one_line(exc), USAGE_EXIT
    if isinstance(exc, OSError) and exc.errno is not None:
        where = " ".join(repr(str(p)) for p in (exc.filename, exc.filename2) if p is not None)
        what = exc.strerror or errno.errorcode.get(exc.errno, str(exc.errno))
        advice = _OS_ADVICE.get(exc.errno)
        message = f"{where + ': ' if where else ''}{what}" + (f" -- {advice}" if advice else "")
        return one_line(message), USAGE_EXIT if isinstance(exc, FileNotFoundError) else RUNTIME_EXIT
    if isinstance(exc, MemoryError):
        return "out of memory: use a smaller --batch-size or a smaller dataset", RUNTIME_EXIT
    text = one_line(exc) or "(no message)"
    if isinstance(exc, RuntimeError) and "out of memory" in text.lower():
        return f"out of memory ({text}): use a smaller --batch-size", RUNTIME_EXIT
    return (f"{type(exc).__name__}: {text} (unexpected; rerun with --debug for the traceback and report it if the "
            "input looks right)"), RUNTIME_EXIT


def run_reported(command: str, func: Callable[[], int], *, debug: bool = False) -> int:
    """Run ``func``; turn any failure into one line on stderr and an exit code (``debug``: let it propagate).
    Warnings are printed as one line each too (``mmer-ext CMD: warning: ...``)."""

    def format_warning(message, category, filename, lineno, line=None) -> str:
        where = f" [{category.__name__} at {filename}:{lineno}]" if debug else f" [{category.__name__}]"
        return f"mmer-ext {command}: warning: {one_line(message)}{where}\n"

    # formatwarning, not showwarning: a caller recording warnings (pytest.warns) still records them. catch_warnings
    # does not restore formatwarning, hence the finally.
    original_format = warnings.formatwarning
    warnings.formatwarning = format_warning
    try:
        return func()
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure gets its one line; --debug shows the traceback
        if debug:
            raise
        message, code = describe(exc)
        print(f"mmer-ext {command}: error: {message}", file=sys.stderr)
        return code
    finally:
        warnings.formatwarning = original_format
