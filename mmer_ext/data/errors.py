"""The errors and warnings every loader of :mod:`mmer_ext.data` shares, and the one place that unpickles.

It sits at the bottom of the data layer (it imports no other data module), so every loader can raise
:class:`DataFormatError` and read a legacy pickle through :func:`read_untrusted_pickle` without importing another
loader.
"""

from __future__ import annotations

import os
import pickle
import warnings
from typing import Any

__all__ = [
    "DataFormatError",
    "NonstandardSplitWarning",
    "UnsafePickleWarning",
    "read_untrusted_pickle",
    "warn_untrusted_pickle",
]


class DataFormatError(ValueError):
    """A dataset file is missing or does not have the expected layout; the message names the file."""


class UnsafePickleWarning(UserWarning):
    """Loading a pickle file: unpickling runs code chosen by whoever wrote the file."""


class NonstandardSplitWarning(UserWarning):
    """A dialogue pickle does not hold the standard train/test split, so scores are not comparable with papers."""


def warn_untrusted_pickle(path: str, *, advice: str, stacklevel: int = 4) -> None:
    """The :class:`UnsafePickleWarning` every loader gives before it unpickles ``path`` (``advice``: the safe route)."""
    warnings.warn(
        f"{path}: reading a pickle file executes whatever code the file's author put in it; load only files from a "
        f"source you trust. Safer: {advice}.", UnsafePickleWarning, stacklevel=stacklevel)


def read_untrusted_pickle(path: str, convert: str = "convert_pickle", safe_spec: str = "dialogues", *,
                          converting: bool = False) -> Any:
    """Unpickle ``path`` after an :class:`UnsafePickleWarning` naming the safe route (``mmer_ext.data.<convert>``,
    then ``'<safe_spec>:DIR'``); a missing or unreadable file is a :class:`DataFormatError`."""
    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: file not found")
    if converting:  # the conversion itself: this is the one time the file is unpickled
        advice = f"this conversion unpickles it once; then share and load '{safe_spec}:DST_DIR', which never does"
    else:
        advice = (f"convert it once to the safe format with mmer_ext.data.{convert}(src, dst_dir) (CLI: `mmer-ext "
                  f"convert SRC DST_DIR`) and then load '{safe_spec}:DST_DIR', which never unpickles")
    warn_untrusted_pickle(path, advice=advice, stacklevel=5)
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a format problem of this file
        raise DataFormatError(f"{path}: cannot unpickle ({type(e).__name__}: {e})") from e
