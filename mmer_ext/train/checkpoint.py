"""Checkpoints: weights in safetensors, training state in a ``torch.save`` file read with ``weights_only=True``.

Every file is written atomically (a temporary file in the same directory, fsync, then ``os.replace``), so a run killed
at any instant leaves either the previous checkpoint or the new one, never a torn file. A model file is
self-describing: its safetensors metadata holds the recipe, the dimensions and the class names needed to rebuild the
module, so ``mmer-ext evaluate model.safetensors`` needs nothing else.

safetensors has no checksum, so a model file also carries the SHA-256 of its tensors (names, dtypes, shapes and
bytes, in name order) under the metadata key ``mmer_ext_sha256``; loading recomputes it and names a corrupted file.
Files written before the checksum existed load with an :class:`UnverifiedCheckpointWarning`. Loading also checks every
tensor's name, shape, dtype and finiteness against the module it goes into.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors import safe_open

from mmer_ext._atomic import atomic_write_bytes

__all__ = [
    "atomic_write_bytes",
    "save_weights",
    "load_weights",
    "read_weights_metadata",
    "save_state",
    "load_state",
    "CheckpointError",
    "UnverifiedCheckpointWarning",
    "tensor_digest",
]

METADATA_KEY = "mmer_ext"
DIGEST_KEY = "mmer_ext_sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint without a checksum (written by an older mmer_ext): its tensors cannot be verified."""


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors in name order: each name, dtype, shape and the raw bytes."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own buffer, not a copy
    return h.hexdigest()


def save_weights(path: str | Path, module: torch.nn.Module, metadata: dict[str, Any]) -> None:
    """The module's state_dict (tied or shared tensors cloned, as safetensors requires), JSON metadata and the
    tensors' SHA-256."""
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    atomic_write_bytes(path, st_save(state, metadata={METADATA_KEY: json.dumps(metadata),
                                                      DIGEST_KEY: tensor_digest(state)}))


def read_weights_metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory; give the model.safetensors in it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file: {e}") from e
    if raw is None:
        raise CheckpointError(f"checkpoint {str(path)!r} was not written by mmer_ext (no {METADATA_KEY!r} metadata)")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: its {METADATA_KEY!r} metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {str(path)!r}: its {METADATA_KEY!r} metadata must be a JSON object, got "
                              f"{type(meta).__name__}")
    return meta


def _check_tensors(path: Path, state: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    """Every tensor the module needs, with its shape and dtype, finite; nothing else."""
    expected = module.state_dict()
    where = f"checkpoint {str(path)!r}"
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where} does not fit {type(module).__name__} (is its recipe right?): "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, want in expected.items():
        got = state[name]
        if got.dtype != want.dtype:
            raise CheckpointError(f"{where}: tensor {name!r} has dtype {got.dtype}, {type(module).__name__} needs "
                                  f"{want.dtype}")
        if got.shape != want.shape:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(got.shape)}, {type(module).__name__} "
                                  f"needs {tuple(want.shape)}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise CheckpointError(f"{where}: tensor {name!r} holds NaN or infinite values; the checkpoint is broken")


def load_weights(path: str | Path, module: torch.nn.Module, *, verify: bool = True) -> None:
    """Load ``path`` into ``module`` after checking its checksum (``verify``) and every tensor against the module."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist") from None
    try:
        state = st_load(data)
        # The header (8-byte little-endian length, then JSON) was just validated by st_load.
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        digest = (header.get("__metadata__") or {}).get(DIGEST_KEY)
    except Exception as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file: {e}") from e
    if verify:
        if digest is None:
            warnings.warn(f"checkpoint {str(path)!r} has no checksum (written by an older mmer_ext); its tensors "
                          "cannot be verified", UnverifiedCheckpointWarning, stacklevel=2)
        elif tensor_digest(state) != digest:
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupted: its tensors do not match the SHA-256 "
                                  "stored at save time (pass --no-verify to load it anyway)")
    _check_tensors(path, state, module)
    module.load_state_dict(state)


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Optimizer, scheduler, RNG and progress; only tensors and plain containers, so ``weights_only`` loads it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_state(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"training state {str(path)!r} does not exist") from None
    except Exception as e:
        raise CheckpointError(f"training state {str(path)!r} cannot be read: {e}") from e
