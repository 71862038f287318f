"""Inference over a split under the missing-modality protocol: predictions, metrics per condition, embeddings."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from mmer_ext.data import NoiseScheduler
from mmer_ext.metrics import condition_confusions, condition_metrics, per_class_f1
from mmer_ext.seeding import derive_seed
from mmer_ext.train.views import views_for

__all__ = ["protocol_view", "iterate_batches", "predict", "evaluate_model", "collect_embeddings", "to_device",
           "with_missing_patterns", "missing_rate_batches", "evaluate_missing_rates", "MR_KEY"]


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
    noise_per: str = "sample",
    noise_padding: bool = False,
) -> Iterator[dict[str, Any]]:
    """Batches in dataset order with the missing modalities corrupted; the noise is drawn from a generator seeded
    by ``seed``, so an evaluation is repeatable. ``noise_per="sample"`` draws the noise level of each utterance on
    its own: the batches run in condition order, and one level per batch ("batch") would leave each condition's
    score resting on a few levels."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=views.collate,
                        num_workers=num_workers)
    generator = torch.Generator().manual_seed(seed)
    for batch in loader:
        extra: dict[str, Any] = {} if corruption == "zero" else {"per": noise_per}
        if noise_padding and corruption != "zero":
            extra["noise_padding"] = True
        batch = views.corrupt(batch, mode=corruption, scheduler=scheduler, generator=generator, **extra)
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
    noise_per: str = "sample",
    noise_padding: bool = False,
) -> dict[str, Any]:
    """Metrics (WA, UA, F1, WF1) per condition label, their ``average`` over the six and the pooled ``overall``;
    with ``with_per_class``, also ``"per_class_F1"``: the F1 of each class on the full-modality condition (or on all
    items when full is not evaluated), and ``"confusion"``: ``{condition label or "overall": counts [true][pred]}``
    (:func:`mmer_ext.metrics.condition_confusions`), which shows the classes a condition collapses. ``batch_size``
    counts utterances, or dialogues for dialogue data. Noise modes draw the noise level per utterance
    (``noise_per="sample"``; "batch" is one level per batch of the condition-ordered expansion) and keep padding
    frames zero unless ``noise_padding``."""
    views = views_for(dataset)
    if batch_size is None:
        batch_size = 16 if views.kind == "dialogues" else 256
    scheduler = NoiseScheduler(num_steps=noise_steps) if corruption != "zero" else None
    out = predict(model, protocol_view(dataset, conditions, seed), views=views, batch_size=batch_size,
                  device=torch.device(device), corruption=corruption, scheduler=scheduler, seed=seed,
                  noise_per=noise_per, noise_padding=noise_padding)
    metrics: dict[str, Any] = condition_metrics(out["label"], out["pred"], out["condition"], num_classes=num_classes)
    if with_per_class:
        full = out["condition"] == 6
        keep = full if bool(full.any()) else torch.ones_like(full)
        metrics["per_class_F1"] = [float(v) for v in per_class_f1(out["label"][keep], out["pred"][keep],
                                                                   num_classes=num_classes)]
        metrics["confusion"] = condition_confusions(out["label"], out["pred"], out["condition"], num_classes)
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


# ---------------------------------------------------------------------------------------------- sequence data (IMDer)
def MR_KEY(mr: float) -> str:  # noqa: N802  (a key format, used like a constant)
    """The results key of one missing rate: ``"MR=0.3"``."""
    return f"MR={mr:.1f}"


def with_missing_patterns(batch: dict[str, Any], patterns: torch.Tensor) -> dict[str, Any]:
    """``batch`` with ``missing_index`` set to ``patterns`` ``[B, 3]`` (A, V, L; 1 = present) and the missing
    modalities zeroed (the clean features stay under ``"*_clean"``: the recovery target)."""
    from mmer_ext.data import condition_index, corrupt_batch

    if patterns.shape != (batch["A"].shape[0], 3):
        raise ValueError(f"patterns must be [{batch['A'].shape[0]}, 3], got {tuple(patterns.shape)}")
    batch = {**batch, "missing_index": patterns, "condition": condition_index(patterns)}
    return corrupt_batch(batch, mode="zero")


def missing_rate_batches(
    dataset: Dataset,
    *,
    mr: float,
    protocol: str,
    batch_size: int,
    device: torch.device,
    seed: int,
) -> Iterator[dict[str, Any]]:
    """Batches of a sequence split in dataset order under IMDer's missing-rate protocol at ``mr``; the patterns are
    drawn from a generator seeded by ``(seed, mr)``, so an evaluation is repeatable and every model sees the same
    missing modalities."""
    from mmer_ext.data import missing_rate_patterns

    views = views_for(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=views.collate)
    generator = torch.Generator().manual_seed(derive_seed(seed, mr, scheme="rate"))
    patterns = missing_rate_patterns(len(dataset), mr, protocol=protocol, batch_size=batch_size, generator=generator)
    start = 0
    for batch in loader:
        n = batch["A"].shape[0]
        yield to_device(with_missing_patterns(batch, patterns[start:start + n]), device)
        start += n


@torch.no_grad()
def evaluate_missing_rates(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    rates: list[float] | tuple[float, ...],
    protocol: str = "per-sample",
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Regression metrics (Acc-2 has-0 / non-0, F1, Acc-7, Acc-5, MAE, Corr) of a sequence model at each missing rate,
    plus recovery quality (``recovery_MSE``, ``recovery_cosine`` of the recovered vs the true projected features, over
    the recovered modalities) when the model exposes ``predict_with_recovery``.

    Returns ``{"MR=0.0": {...}, ..., "average": mean of each metric over the rates, "overall": the single rate's
    metrics when one rate is given, else "average"}``.
    """
    from mmer_ext.metrics import recovery_metrics, regression_metrics

    if not rates:
        raise ValueError("rates must name at least one missing rate")
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty split")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {}
    try:
        for mr in rates:
            labels, preds, recovered, targets = [], [], [], []
            # The recovery sampler's noise too comes from a seeded generator: the sweep is repeatable.
            sampler_gen = torch.Generator(device).manual_seed(derive_seed(seed, mr, scheme="rate"))
            for batch in missing_rate_batches(dataset, mr=mr, protocol=protocol, batch_size=batch_size,
                                              device=device, seed=seed):
                if hasattr(model, "predict_with_recovery"):
                    pred, recovery = model.predict_with_recovery(batch, generator=sampler_gen)
                    for rec, target in recovery.values():
                        recovered.append(rec.flatten(1).cpu())
                        targets.append(target.flatten(1).cpu())
                else:
                    pred = model.predict(batch)
                labels.append(batch["label"].cpu())
                preds.append(pred.reshape(-1).cpu())
            metrics = regression_metrics(torch.cat(labels), torch.cat(preds))
            if recovered:
                rec = recovery_metrics(torch.cat(recovered), torch.cat(targets))
                metrics.update({f"recovery_{k}": v for k, v in rec.items()})
            results[MR_KEY(mr)] = metrics
    finally:
        model.train(was_training)
    keys = sorted({k for m in results.values() for k in m})
    results["average"] = {k: sum(m[k] for m in results.values() if k in m) / sum(k in m for m in results.values())
                          for k in keys}
    results["overall"] = results[MR_KEY(rates[0])] if len(rates) == 1 else results["average"]
    return results
