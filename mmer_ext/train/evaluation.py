"""Inference over a split under the missing-modality protocol: predictions, metrics per condition, embeddings."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from mmer_ext.data import NoiseScheduler
from mmer_ext.metrics import condition_metrics, per_class_f1
from mmer_ext.train.views import views_for

__all__ = ["protocol_view", "iterate_batches", "predict", "evaluate_model", "collect_embeddings", "to_device"]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def protocol_view(dataset: Dataset, conditions: str, seed: int = 0) -> Dataset:
    """``"six"``: every utterance under the six missing conditions (MMIN's test expansion); ``"full"``: all present;
    ``"six+full"``: both, so one pass gives the paper's whole table."""
    make = views_for(dataset).make
    if conditions == "six":
        return make(dataset, "expand", seed)
    if conditions == "full":
        return make(dataset, "full", seed)
    if conditions == "six+full":
        return torch.utils.data.ConcatDataset([make(dataset, "expand", seed), make(dataset, "full", seed)])
    raise ValueError(f"conditions must be 'six', 'full' or 'six+full', got {conditions!r}")


def iterate_batches(
    dataset: Dataset,
    *,
    views,
    batch_size: int,
    device: torch.device,
    corruption: str,
    scheduler: NoiseScheduler | None,
    seed: int,
    num_workers: int = 0,
) -> Iterator[dict[str, Any]]:
    """Batches in dataset order with the missing modalities corrupted; the noise is drawn from a generator seeded
    by ``seed``, so an evaluation is repeatable."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=views.collate,
                        num_workers=num_workers)
    generator = torch.Generator().manual_seed(seed)
    for batch in loader:
        batch = views.corrupt(batch, mode=corruption, scheduler=scheduler, generator=generator)
        yield to_device(batch, device)


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: Dataset, **kwargs: Any) -> dict[str, torch.Tensor]:
    was_training = model.training
    model.eval()
    labels, preds, conditions = [], [], []
    try:
        for batch in iterate_batches(dataset, **kwargs):
            logits = model(batch)
            labels.append(batch["label"].cpu())
            preds.append(logits.argmax(dim=-1).cpu())
            conditions.append(batch["condition"].cpu())
    finally:
        model.train(was_training)
    if not labels:
        raise ValueError("cannot evaluate on an empty split")
    return {"label": torch.cat(labels), "pred": torch.cat(preds), "condition": torch.cat(conditions)}


def evaluate_model(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    num_classes: int,
    conditions: str = "six+full",
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    corruption: str = "zero",
    noise_steps: int = 100,
    seed: int = 0,
    with_per_class: bool = False,
) -> dict[str, Any]:
    """Metrics (WA, UA, F1, WF1) per condition label, their ``average`` over the six and the pooled ``overall``;
    with ``with_per_class``, also ``"per_class_F1"``: the F1 of each class on the full-modality condition (or on all
    items when full is not evaluated). ``batch_size`` counts utterances, or dialogues for dialogue data."""
    views = views_for(dataset)
    if batch_size is None:
        batch_size = 16 if views.kind == "dialogues" else 256
    scheduler = NoiseScheduler(num_steps=noise_steps) if corruption != "zero" else None
    out = predict(model, protocol_view(dataset, conditions, seed), views=views, batch_size=batch_size,
                  device=torch.device(device), corruption=corruption, scheduler=scheduler, seed=seed)
    metrics: dict[str, Any] = condition_metrics(out["label"], out["pred"], out["condition"], num_classes=num_classes)
    if with_per_class:
        full = out["condition"] == 6
        keep = full if bool(full.any()) else torch.ones_like(full)
        metrics["per_class_F1"] = [float(v) for v in per_class_f1(out["label"][keep], out["pred"][keep],
                                                                   num_classes=num_classes)]
    return metrics


@torch.no_grad()
def collect_embeddings(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    corruption: str = "zero",
    noise_steps: int = 100,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The imagined and target joint embeddings of an imagination model over the six-condition expansion."""
    if not hasattr(model, "embeddings"):
        raise TypeError(f"{type(model).__name__} has no imagined embeddings")
    scheduler = NoiseScheduler(num_steps=noise_steps) if corruption != "zero" else None
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"imagined": [], "target": [], "label": [], "condition": []}
    try:
        for batch in iterate_batches(protocol_view(dataset, "six", seed), views=views_for(dataset), batch_size=batch_size,
                                     device=torch.device(device), corruption=corruption, scheduler=scheduler, seed=seed):
            emb = model.embeddings(batch)
            parts["imagined"].append(emb["imagined"].cpu())
            parts["target"].append(emb["target"].cpu())
            parts["label"].append(batch["label"].cpu())
            parts["condition"].append(batch["condition"].cpu())
    finally:
        model.train(was_training)
    return {k: torch.cat(v) for k, v in parts.items()}
