"""Checkpoint files: safetensors weights with metadata, weights_only training state, atomic writes, clear errors."""

from __future__ import annotations

import os

import pytest
import torch

from mmer_ext.train.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    load_state,
    load_weights,
    read_weights_metadata,
    save_state,
    save_weights,
)


class Opaque:
    """An arbitrary object: weights_only loading must refuse to unpickle it."""


def _net():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_weights_round_trip_with_metadata(tmp_path):
    net, other = _net(), _net()
    save_weights(tmp_path / "w.safetensors", net, {"recipe": "mmin", "dims": [1, 2, 3]})
    assert read_weights_metadata(tmp_path / "w.safetensors") == {"recipe": "mmin", "dims": [1, 2, 3]}
    load_weights(tmp_path / "w.safetensors", other)
    for a, b in zip(net.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_weights_that_do_not_fit(tmp_path):
    save_weights(tmp_path / "w.safetensors", _net(), {})
    with pytest.raises(CheckpointError, match="does not fit"):
        load_weights(tmp_path / "w.safetensors", torch.nn.Linear(3, 4))


def test_unreadable_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_weights_metadata(tmp_path / "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 40)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_weights_metadata(junk)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_weights(junk, _net())
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not written by mmer_ext"):
        read_weights_metadata(tmp_path / "foreign.safetensors")


def test_state_is_loaded_weights_only(tmp_path):
    net = _net()
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(5, 3)).sum().backward()
    opt.step()
    save_state(tmp_path / "s.pt", {"optimizer": opt.state_dict(), "epoch": 3, "history": "[]"})
    state = load_state(tmp_path / "s.pt")
    assert state["epoch"] == 3
    fresh = torch.optim.Adam(_net().parameters())
    fresh.load_state_dict(state["optimizer"])
    torch.save({"x": Opaque()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_state(tmp_path / "evil.pt")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
