"""Hand-built batches in the data layer's collated format, shared by the MMIN-family model tests."""

from __future__ import annotations

import torch

from mmer_ext.data import ModalityDims

SIX = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]])
C = 4
DIMS = ModalityDims(12, 10, 16)


def make_batch(dims=DIMS, b: int = 8, steps=(7, 5, 6), missing=None, seed: int = 0) -> dict:
    """A collated, zero-corrupted batch built by hand (the data layer's format)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.stack([torch.randint(1, t + 1, (b,), generator=g) for t in steps], 1)
    lengths[0] = torch.tensor(steps)
    if missing is None:
        missing = SIX[torch.arange(b) % 6]
    batch = {"label": torch.randint(0, C, (b,), generator=g), "index": torch.arange(b), "lengths": lengths,
             "missing_index": missing}
    for j, (m, d, t) in enumerate(zip("AVL", dims, steps)):
        x = torch.randn(b, t, d, generator=g)
        x = x * (torch.arange(t).unsqueeze(0) < lengths[:, j : j + 1]).unsqueeze(-1)
        batch[f"{m}_clean"] = x
        batch[m] = x * missing[:, j].view(-1, 1, 1)
    return batch


def train_steps(model, batch: dict, steps: int, *, lr: float, betas=(0.9, 0.999)) -> list[float]:
    """``steps`` Adam steps on one fixed batch, clipping as the trainer does; the loss before each step."""
    opt = torch.optim.Adam(model.trainable_parameters(), lr=lr, betas=betas)
    losses = []
    for _ in range(steps):
        loss, _ = model.training_loss(batch)
        opt.zero_grad()
        loss.backward()
        model.clip_gradients_()
        opt.step()
        losses.append(loss.item())
    return losses
