"""Fixtures of the sampler tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # Small tensors on two shared cores: a second intra-op thread only contends (the root conftest restores it).
    torch.set_num_threads(1)
