"""Checkpoints: weights in safetensors, training state in a ``torch.save`` file read with ``weights_only=True``.

Every file is written atomically (a temporary file in the same directory, fsync, then ``os.replace``), so a run killed
at any instant leaves either the previous checkpoint or the new one, never a torn file. A model file is
self-describing: its safetensors metadata holds the recipe, the dimensions and the class names needed to rebuild the
module, so ``mmer-ext evaluate model.safetensors`` needs nothing else.
"""

from __future__ import annotations

import io
import json
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
]

METADATA_KEY = "mmer_ext"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file."""


def save_weights(path: str | Path, module: torch.nn.Module, metadata: dict[str, Any]) -> None:
    """The module's state_dict (tied or shared tensors cloned, as safetensors requires) plus JSON metadata."""
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    atomic_write_bytes(path, st_save(state, metadata={METADATA_KEY: json.dumps(metadata)}))


def read_weights_metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file: {e}") from e
    if raw is None:
        raise CheckpointError(f"checkpoint {str(path)!r} was not written by mmer_ext (no {METADATA_KEY!r} metadata)")
    return json.loads(raw)


def load_weights(path: str | Path, module: torch.nn.Module) -> None:
    path = Path(path)
    try:
        state = st_load(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist") from None
    except Exception as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file: {e}") from e
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit {type(module).__name__}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )


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
