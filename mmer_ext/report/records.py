"""The JSON record of an experiment: results made JSON-safe, with the environment that produced them, written
atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmer_ext._atomic import atomic_open

PathLike = str | os.PathLike


def to_jsonable(obj: Any, _where: str = "payload") -> Any:
    """Convert ``obj`` into plain JSON data (dict/list/str/int/float/bool/None).

    Handles numpy scalars and arrays, torch tensors, paths, dataclasses (e.g. training recipes), OmegaConf configs,
    tuples and sets, and classes or functions (written as their ``module.qualname``). Non-finite floats become
    ``None`` because JSON has no NaN (Python would write the non-standard ``NaN`` token, which strict parsers
    reject). Anything else raises ``TypeError`` naming where in the payload it was found.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, bool):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "detach") and hasattr(obj, "cpu") and hasattr(obj, "tolist"):  # torch.Tensor
        return to_jsonable(obj.detach().cpu().tolist(), _where)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), _where)
    if isinstance(obj, type) or (callable(obj) and hasattr(obj, "__qualname__")):
        return f"{getattr(obj, '__module__', '?')}.{obj.__qualname__}"
    if dataclasses.is_dataclass(obj):
        return {f.name: to_jsonable(getattr(obj, f.name), f"{_where}.{f.name}") for f in dataclasses.fields(obj)}
    try:  # OmegaConf is optional; configs may be DictConfig/ListConfig
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return to_jsonable(OmegaConf.to_container(obj, resolve=True), _where)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, f"{_where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{_where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return [to_jsonable(v, _where) for v in sorted(obj, key=repr)]
    raise TypeError(f"{_where}: cannot convert {type(obj).__name__} to JSON")


def _environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
    }
    for mod in ("torch", "sklearn"):
        with contextlib.suppress(Exception):
            env[mod] = __import__(mod).__version__
    with contextlib.suppress(Exception):
        from mmer_ext import __version__

        env["mmer_ext"] = __version__
    return env


def write_results_json(
    path: PathLike,
    payload: Mapping[str, Any],
    *,
    seeds: Sequence[int] | None = None,
    config: Any = None,
    timings: Mapping[str, float] | None = None,
) -> Path:
    """Write ``payload`` plus a ``"meta"`` record as indented JSON (atomically).

    The written object is ``payload``'s keys followed by ``"meta"``: ``{"created_utc", "environment", "seeds",
    "config", "timings"}`` (the last three only when given). If ``payload`` already has a ``"meta"`` mapping, its
    keys win over the generated ones. Conversion follows :func:`to_jsonable` (NaN -> null); it runs completely
    before the file is opened, and an unconvertible object raises ``TypeError`` and leaves ``path`` untouched.
    """
    if not isinstance(payload, Mapping):
        raise TypeError(f"payload must be a mapping, got {type(payload).__name__}")
    meta: dict[str, Any] = {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": _environment(),
    }
    if seeds is not None:
        meta["seeds"] = seeds
    if config is not None:
        meta["config"] = config
    if timings is not None:
        meta["timings"] = timings
    doc = dict(payload)
    if isinstance(doc.get("meta"), Mapping):
        meta.update(doc["meta"])
    doc["meta"] = meta
    data = to_jsonable(doc)
    with atomic_open(path, "w") as fh:
        json.dump(data, fh, indent=2, allow_nan=False)
        fh.write("\n")
    return Path(path)


# --------------------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------------------
