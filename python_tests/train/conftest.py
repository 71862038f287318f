"""Tiny synthetic splits shared by the trainer and CLI tests: a few seconds per model on a 2-core CPU."""

from __future__ import annotations

import pytest
from tiny_data import TINY


@pytest.fixture(scope="session")
def tiny_splits():
    from mmer_ext.data import make_synthetic_utterances

    return make_synthetic_utterances(seed=0, **TINY)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices on two shared cores: a second intra-op thread only adds contention.
    import torch

    torch.set_num_threads(1)
