"""The trainer: runs a model's recipe stage by stage (teacher, then student), with validation-based selection,
atomic per-epoch checkpoints, exact resumption and optional DistributedDataParallel.

Determinism is what makes resumption exact: every epoch re-seeds the global RNG (dropout, VAE sampling), the
corruption noise and the data order from ``(seed, stage, epoch)``, so an epoch is a pure function of the weights and
optimizer state it starts from. A run killed mid-epoch restarts that epoch from the last end-of-epoch checkpoint and
ends with the same weights as a run that was never interrupted.

Layout of ``out_dir``::

    run.json                     the resolved config, the recipe, the data, the plan, versions, git commit, device
    metrics.csv                  one row per trained epoch: stage, epoch, lr, seconds, train losses, val metrics
    tensorboard/<stage>/         the same as TensorBoard events (when tensorboard is installed)
    training_curves.png          losses and validation metrics per epoch, drawn when training ends
    <stage>/latest.json          points at the newest complete (weights, state) pair of that stage
    <stage>/epoch-NNN.safetensors  the newest `keep_checkpoints` epochs' weights
    <stage>/epoch-NNN.state.pt   optimizer, scheduler and progress of the newest epoch (deleted when the stage ends)
    <stage>/best.safetensors     the weights with the best validation metric so far (a hard link to its epoch file
                                 while that one is kept)
    <stage>/done.json            the stage finished: best epoch and its validation metrics
    model.safetensors            the final model (last stage, best epoch), self-describing
    test_metrics.json            the final model on the test split, six conditions and full (with per-class F1 and
                                 a confusion matrix per condition for classification)
    confusion_matrices.png       those confusion matrices, normalised by true class
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from mmer_ext.data import NoiseScheduler
from mmer_ext.models.recipes import RECIPES, Stage
from mmer_ext.train.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    load_state,
    load_weights,
    read_weights_metadata,
    save_state,
    save_weights,
)
from mmer_ext.train.config import CORRUPTIONS, ConfigError, TrainConfig, config_to_dict, load_config, validate
from mmer_ext.train.distributed import DistContext, init_distributed, resolve_device
from mmer_ext.train.evaluation import evaluate_missing_rates, evaluate_model, to_device, with_missing_patterns
from mmer_ext.train.plan import format_plan, make_plan
from mmer_ext.train.retention import drop_states, epoch_name, link_or_copy, prune_epochs
from mmer_ext.train.rundir import check_out_dir, inside, run_lock
from mmer_ext.train.tracking import RunTracker, run_environment
from mmer_ext.train.views import STAGE_DATA_MODES, check_data_kind, views_for

__all__ = ["fit", "FitResult", "resolve_stages", "build_models", "load_model", "train_stage", "evaluate_split"]

FORMAT_VERSION = 1


def _write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, default=str) + "\n").encode())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e}); delete it or train with --no-resume") from e


def _derive_seed(*parts: int) -> int:
    # A fixed mixing of the parts: Python's hash() of a tuple is salted per process for str, not for int, but be explicit.
    value = 0x9E3779B1
    for p in parts:
        value = (value * 1_000_003 + int(p) + 1) % (2**63 - 1)
    return value


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def resolve_stages(cfg: TrainConfig) -> tuple[Stage, ...]:
    """The recipe's stages with the config's overrides applied.

    ``epochs`` (or ``stage_epochs[stage.name]``) is the total number of epochs of a stage; the recipe's split
    between constant-LR epochs and linearly decaying ones is kept unless ``epochs_decay`` is given too.
    """
    names = [s.name for s in RECIPES[cfg.model]]
    for field_name in ("hparams", "stage_epochs"):
        unknown = sorted(set(getattr(cfg, field_name)) - set(names))
        if unknown:
            raise ConfigError(f"{field_name} names stage(s) {unknown} that {cfg.model} does not have; its stages: {names}")
    stages = []
    for stage in RECIPES[cfg.model]:
        total = stage.epochs + stage.epochs_decay
        epochs, decay = stage.epochs, stage.epochs_decay
        wanted = cfg.stage_epochs.get(stage.name, cfg.epochs)
        if wanted is not None:
            if cfg.epochs_decay is not None:
                decay = min(cfg.epochs_decay, wanted - 1)
            else:
                decay = math.floor(wanted * stage.epochs_decay / total)
            epochs = wanted - decay
        elif cfg.epochs_decay is not None:
            decay = cfg.epochs_decay
        hparams = {**stage.hparams, **_sampler_hparams(cfg, stage), **cfg.hparams.get(stage.name, {})}
        repeats = stage.repeats
        if wanted is not None:
            # An explicit epoch count counts passes over the data, also for a stage that repeats them per epoch.
            repeats = 1
        if stage.inherit_hparams and stages:
            hparams = {**stages[-1].hparams, **hparams}
        stages.append(replace(
            stage,
            epochs=epochs,
            epochs_decay=decay,
            batch_size=stage.batch_size if cfg.batch_size is None else cfg.batch_size,
            lr=stage.lr if cfg.lr is None else cfg.lr,
            corruption=cfg.corruption or stage.corruption,
            hparams=hparams,
            repeats=repeats,
        ))
    return tuple(stages)


def _noise_options(stage: Stage) -> dict[str, Any]:
    """Extra arguments of the corruption: only ``noise_padding`` when a noising recipe asks for it, so the dialogue
    views' corruption (which has no such argument) keeps its signature."""
    return {"noise_padding": True} if stage.noise_padding and stage.corruption != "zero" else {}


def _sampler_hparams(cfg: TrainConfig, stage: Stage) -> dict[str, Any]:
    """``--sampler`` / ``--steps`` as constructor arguments of the models that sample (IMDer)."""
    params = inspect.signature(stage.model).parameters
    out: dict[str, Any] = {}
    if cfg.sampler is not None and "sampler" in params:
        out["sampler"] = cfg.sampler
    if cfg.sampler_steps is not None and "steps" in params:
        out["steps"] = cfg.sampler_steps
    return out


def _stage_missing_rate(cfg: TrainConfig, stage: Stage) -> float:
    # IMDer's first stage pretrains on complete data (MR 0); the second trains at the configured MR.
    return 0.0 if stage.data == "complete" else cfg.missing_rate


# Constructor arguments that come from the data, not the recipe (MMGCN's speaker embedding table, say).
_DATA_KWARGS = ("num_speakers",)


def data_kwargs(model_cls: type, dataset: Any) -> dict[str, Any]:
    params = inspect.signature(model_cls).parameters
    return {k: getattr(dataset, k) for k in _DATA_KWARGS if k in params and hasattr(dataset, k)}


def build_models(stages: tuple[Stage, ...], dims, num_classes: int,
                 extra: dict[str, Any] | None = None) -> list[torch.nn.Module]:
    models: list[torch.nn.Module] = []
    for stage in stages:
        teacher = models[-1] if models else None
        params = inspect.signature(stage.model).parameters
        kwargs = {**{k: v for k, v in (extra or {}).items() if k in params}, **stage.hparams}
        if teacher is not None:
            kwargs["teacher"] = teacher
        models.append(stage.model(dims, num_classes, **kwargs))
    return models


def _lr_lambda(epochs: int, epochs_decay: int) -> Callable[[int], float]:
    # Constant for `epochs`, then linear towards 0 over `epochs_decay` (MMIN's "linear" policy).
    def factor(epoch: int) -> float:
        return 1.0 - max(0, epoch + 1 - epochs) / float(epochs_decay + 1)

    return factor


class _LossModule(torch.nn.Module):
    """DDP hooks ``forward``; the models' training entry point is ``training_loss``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]):
        return self.model.training_loss(batch)


@dataclass
class StageResult:
    name: str
    best_epoch: int
    best_metric: float
    val_metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class FitResult:
    out_dir: Path
    model: torch.nn.Module
    stages: list[StageResult]
    test_metrics: dict[str, Any] | None
    metadata: dict[str, Any]


def _stated_hparams(stage: Stage) -> dict[str, Any]:
    """The stage's hparams with every constructor argument whose default has changed written out (its current
    default unless the stage sets it), so that the file keeps its meaning when a default changes again."""
    legacy = getattr(stage.model, "legacy_defaults", {})
    params = inspect.signature(stage.model).parameters
    return {**{k: params[k].default for k in legacy if k in params}, **stage.hparams}


def _restored_hparams(stage: Stage, hparams: dict[str, Any]) -> dict[str, Any]:
    """Saved hparams without a key of ``legacy_defaults`` were written when its default was the legacy value."""
    return {**getattr(stage.model, "legacy_defaults", {}), **hparams}


def _model_metadata(cfg: TrainConfig, stages: tuple[Stage, ...], upto: int, dims, num_classes: int,
                    class_names, extra: dict[str, Any] | None = None, data_kw: dict[str, Any] | None = None,
                    ) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "recipe": cfg.model,
        "stages": [s.name for s in stages[: upto + 1]],
        "hparams": [_stated_hparams(s) for s in stages[: upto + 1]],
        "corruption": stages[upto].corruption,
        "noise_steps": cfg.noise_steps,
        "dims": list(dims),
        "num_classes": num_classes,
        "data_kwargs": data_kw,
        "class_names": list(class_names),
        "config": config_to_dict(cfg),
        **(extra or {}),
    }


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_model_metadata(path: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The metadata of a model file, checked key by key before it is used to rebuild the model (an edited or
    foreign file gets a message naming the key, not a KeyError deep in a constructor)."""
    where = f"checkpoint {str(path)!r}"
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{where} has format {meta.get('format')!r}; this mmer_ext reads {FORMAT_VERSION}")
    missing = [k for k in ("recipe", "stages", "hparams", "corruption", "noise_steps", "dims", "num_classes",
                           "class_names", "config") if k not in meta]
    if missing:
        raise CheckpointError(f"{where}: metadata lacks {', '.join(missing)}; it was not written by mmer-ext train")
    recipe = RECIPES.get(meta["recipe"]) if isinstance(meta["recipe"], str) else None
    if recipe is None:
        raise CheckpointError(f"{where} names an unknown recipe {meta['recipe']!r}")
    names = [s.name for s in recipe]
    hparams = meta["hparams"]
    if not (isinstance(hparams, list) and 1 <= len(hparams) <= len(recipe)
            and all(isinstance(h, dict) for h in hparams)):
        raise CheckpointError(f"{where}: hparams must be a list of 1..{len(recipe)} objects (one per stage of "
                              f"{meta['recipe']}), got {hparams!r:.80}")
    # Stages by name, in the recipe's order and from its first: a file written before a recipe gained a stage
    # (IMDer's "score") names the stages it has.
    stages = meta["stages"]
    if not (isinstance(stages, list) and len(stages) == len(hparams) and all(n in names for n in stages)
            and stages[:1] == names[:1] and [n for n in names if n in stages] == stages):
        raise CheckpointError(f"{where}: stages {stages!r} are not the stages {names[:len(hparams)]} of recipe "
                              f"{meta['recipe']} (or others of {names} by name, in that order, from the first)")
    dims = meta["dims"]
    if not (isinstance(dims, list) and len(dims) == 3 and all(_is_int(d, 1) for d in dims)):
        raise CheckpointError(f"{where}: dims must be three positive integers (A, V, L), got {dims!r}")
    if not _is_int(meta["num_classes"], 1):
        raise CheckpointError(f"{where}: num_classes must be a positive integer, got {meta['num_classes']!r}")
    if not (isinstance(meta["class_names"], list) and len(meta["class_names"]) == meta["num_classes"]):
        raise CheckpointError(f"{where}: class_names must list num_classes={meta['num_classes']} names, got "
                              f"{meta['class_names']!r:.80}")
    if meta["corruption"] not in CORRUPTIONS:
        raise CheckpointError(f"{where}: corruption {meta['corruption']!r} is not one of {', '.join(CORRUPTIONS)}")
    if not _is_int(meta["noise_steps"], 1):
        raise CheckpointError(f"{where}: noise_steps must be a positive integer, got {meta['noise_steps']!r}")
    if meta.get("data_kwargs") is not None and not isinstance(meta["data_kwargs"], dict):
        raise CheckpointError(f"{where}: data_kwargs must be an object, got {meta['data_kwargs']!r:.80}")
    if not isinstance(meta["config"], dict):
        raise CheckpointError(f"{where}: config must be an object, got {meta['config']!r:.80}")
    try:
        cfg = load_config(None, **meta["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{where}: its training config is not valid: {e}") from e
    if cfg.model != meta["recipe"]:
        raise CheckpointError(f"{where}: metadata says recipe {meta['recipe']!r} but its config says model "
                              f"{cfg.model!r}")
    return {**meta, "config": config_to_dict(cfg)}


def load_model(path: str | Path, map_location: str | torch.device = "cpu", *,
               verify: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a trained model (its teachers included) from a ``model.safetensors`` written by :func:`fit`; the
    metadata, the checksum (``verify``) and every tensor are checked before use."""
    from mmer_ext.data import ModalityDims

    meta = check_model_metadata(path, read_weights_metadata(path))
    by_name = {s.name: s for s in RECIPES[meta["recipe"]]}
    stages = tuple(replace(by_name[n], hparams=_restored_hparams(by_name[n], h))
                   for n, h in zip(meta["stages"], meta["hparams"]))
    try:
        models = build_models(stages, ModalityDims(*meta["dims"]), meta["num_classes"], meta.get("data_kwargs"))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: its metadata does not build a {meta['recipe']} model "
                              f"({type(e).__name__}: {e})") from e
    model = models[-1]
    load_weights(path, model, verify=verify)
    model.to(map_location).eval()
    return model, meta


def _stage_fingerprint(cfg: TrainConfig, stage: Stage) -> dict[str, Any]:
    """What a stage's checkpoints depend on: resuming under anything else would silently mix two runs."""
    fields = {k: v for k, v in asdict(stage).items() if k != "model"}
    return json.loads(json.dumps({
        "recipe": cfg.model, "model": stage.model.__name__, **fields,
        "data": cfg.data, "data_options": cfg.data_options, "fold": cfg.fold, "seed": cfg.seed,
        "noise_steps": cfg.noise_steps, "missing_rate": _stage_missing_rate(cfg, stage),
        "missing_protocol": cfg.missing_protocol,
    }, default=str))


def _claim_stage_dir(stage_dir: Path, fingerprint: dict[str, Any], resume: bool, ctx: DistContext) -> None:
    """Refuse to resume a stage trained under another configuration; forget old progress when not resuming."""
    path = stage_dir / "stage.json"
    _check_stage_dir(stage_dir, fingerprint, resume)
    if ctx.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            # The pointers go; the files they name are overwritten as the new run reaches them.
            for name in ("latest.json", "done.json"):
                (stage_dir / name).unlink(missing_ok=True)
        _write_json(path, fingerprint)
    ctx.barrier()


def _check_stage_dir(stage_dir: Path, fingerprint: dict[str, Any], resume: bool) -> None:
    path = stage_dir / "stage.json"
    if resume and path.is_file():
        old = _read_json(path)
        if not isinstance(old, dict):
            raise CheckpointError(f"{str(path)!r} must hold a JSON object; delete it or train with --no-resume")
        changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if changed:
            raise ConfigError(
                f"{stage_dir} holds a stage trained with other settings ({', '.join(changed)}); "
                "train into another --out, or pass --no-resume to start this stage afresh"
            )


def _stage_done(stage_dir: Path) -> dict[str, Any] | None:
    done = stage_dir / "done.json"
    return _read_json(done) if done.is_file() else None


def _pointer(latest: Path) -> dict[str, Path]:
    """The (weights, state) files ``latest.json`` names, each resolved inside its stage directory."""
    pointer = _read_json(latest)
    if not isinstance(pointer, dict) or not isinstance(pointer.get("epoch"), int):
        raise CheckpointError(f"{str(latest)!r} must hold a JSON object with weights, state and epoch; delete it or "
                              "train with --no-resume")
    return {key: inside(latest.parent, pointer.get(key), f"{latest} key {key!r}") for key in ("weights", "state")}


def train_stage(
    stage: Stage,
    stage_index: int,
    model: torch.nn.Module,
    splits: dict[str, Any],
    cfg: TrainConfig,
    stage_dir: Path,
    *,
    device: torch.device,
    ctx: DistContext,
    num_classes: int,
    metadata: dict[str, Any],
    log: Callable[[str], None],
    tracker: RunTracker | None = None,
) -> StageResult:
    start_time = time.perf_counter()
    total_epochs = stage.epochs + stage.epochs_decay
    views = views_for(splits["train"])
    base_view = views.make(splits["train"], STAGE_DATA_MODES[stage.data], cfg.seed)
    # `repeats` passes over the data make one epoch (one validation and checkpoint per `repeats` passes).
    train_view = base_view if stage.repeats == 1 else torch.utils.data.ConcatDataset([base_view] * stage.repeats)
    val_conditions = "full" if STAGE_DATA_MODES[stage.data] == "full" else "six"
    # Sequence data (IMDer): missingness comes from the missing-rate protocol, drawn per epoch over the loader's order.
    missing_rate = _stage_missing_rate(cfg, stage) if views.kind == "sequences" else None
    if stage.batch_size % ctx.world_size:
        raise ValueError(f"batch_size {stage.batch_size} must be divisible by the number of processes {ctx.world_size}")
    sampler = DistributedSampler(train_view, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=_derive_seed(cfg.seed, stage_index), drop_last=False)
    loader = DataLoader(train_view, batch_size=stage.batch_size // ctx.world_size, sampler=sampler,
                        collate_fn=views.collate, num_workers=cfg.num_workers)
    noise = NoiseScheduler(num_steps=cfg.noise_steps) if stage.corruption != "zero" else None

    model.to(device)
    params = [p for p in model.trainable_parameters()]
    optimizer = torch.optim.Adam(params, lr=stage.lr, betas=tuple(stage.betas), weight_decay=stage.weight_decay)
    if stage.lr_policy == "plateau":
        lr_scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=stage.select_mode, factor=0.5, patience=stage.plateau_patience)
    elif stage.lr_policy == "linear":
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(stage.epochs, stage.epochs_decay))
    else:
        raise ValueError(f"stage {stage.name!r}: unknown lr_policy {stage.lr_policy!r}")
    if stage.select_mode == "last":  # a stage whose metric does not judge it (IMDer's score pretraining)
        better = lambda a, b: True  # noqa: E731
    else:
        better = (lambda a, b: a < b) if stage.select_mode == "min" else (lambda a, b: a > b)
    worst = math.inf if stage.select_mode in ("min", "last") else -math.inf
    step_module: torch.nn.Module = _LossModule(model)
    if ctx.enabled:
        step_module = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)

    first_epoch, best_metric, best_epoch, history, best_val = 0, worst, -1, [], {}
    latest = stage_dir / "latest.json"
    if cfg.resume and latest.is_file():
        pointer = _pointer(latest)
        load_weights(pointer["weights"], model)
        state = load_state(pointer["state"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        first_epoch = int(state["epoch"]) + 1
        best_metric, best_epoch = float(state["best_metric"]), int(state["best_epoch"])
        history, best_val = json.loads(state["history"]), json.loads(state["best_val"])
        log(f"[{stage.name}] resuming after epoch {first_epoch} from {stage_dir}")
    if tracker is not None:
        tracker.stage_started(stage.name, (stage.select_metric, stage.select_mode), history)

    clip = getattr(model, "clip_grad_norm", None) or getattr(model, "clip_grad_value", None)
    for epoch in range(first_epoch, total_epochs):
        if stage.early_stop is not None and best_epoch > 0 and epoch + 1 - best_epoch > stage.early_stop:
            log(f"[{cfg.model}/{stage.name}] early stop: no better validation {stage.select_metric} "
                f"for {stage.early_stop} epochs (best @ {best_epoch})")
            break
        epoch_start = time.perf_counter()
        # reseed_each_pass (MMGCN's authors): one fixed seed at every pass, so every epoch repeats the same data
        # order, dropout masks and noise; otherwise each epoch has its own stream.
        pass_epoch = 0 if stage.reseed_each_pass is not None else epoch
        pass_seed = (stage.reseed_each_pass if stage.reseed_each_pass is not None
                     else _derive_seed(cfg.seed, stage_index, epoch))
        torch.manual_seed(pass_seed)
        corruption_gen = torch.Generator().manual_seed(_derive_seed(cfg.seed, stage_index, pass_epoch, 1))
        if hasattr(base_view, "set_epoch"):
            base_view.set_epoch(pass_epoch)
        sampler.set_epoch(pass_epoch)
        patterns = None
        if missing_rate is not None:
            from mmer_ext.data import missing_rate_patterns

            patterns = missing_rate_patterns(
                len(sampler), missing_rate, protocol=cfg.missing_protocol, batch_size=loader.batch_size,
                generator=torch.Generator().manual_seed(_derive_seed(cfg.seed, stage_index, epoch, 2)))
        model.train()
        sums: dict[str, float] = {}
        count = 0
        bar = tqdm(loader, desc=f"{cfg.model}/{stage.name} {epoch + 1}/{total_epochs}", leave=False,
                   disable=(not cfg.progress) or (not ctx.is_main) or None, dynamic_ncols=True)
        for batch in bar:
            if patterns is not None:
                batch = with_missing_patterns(batch, patterns[count * loader.batch_size:][: batch["A"].shape[0]])
            else:
                batch = views.corrupt(batch, mode=stage.corruption, scheduler=noise, generator=corruption_gen,
                                      **_noise_options(stage))
            batch = to_device(batch, device)
            loss, parts = step_module(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"[{stage.name}] loss became {loss.item()} at epoch {epoch + 1}; parts: "
                                         + ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                # Per network (A, V, L encoders, AE, classifier ...) like the authors, where the model knows its nets.
                if hasattr(model, "clip_gradients_"):
                    model.clip_gradients_()
                else:
                    torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            if hasattr(model, "after_optimizer_step"):
                model.after_optimizer_step()  # e.g. IMDer's EMA of the score weights
            count += 1
            for k, v in {"loss": loss.detach(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        if stage.lr_policy == "linear":
            lr_scheduler.step()
        train_losses = {k: v / max(count, 1) for k, v in sums.items()}

        record: dict[str, Any] = {"epoch": epoch + 1, "train": train_losses, "lr": optimizer.param_groups[0]["lr"]}
        # Plateau LR and early stopping act on the validation metric, so with them every rank validates (the result
        # is deterministic, hence the same everywhere); otherwise only the main rank does.
        validate_everywhere = stage.lr_policy == "plateau" or stage.early_stop is not None
        improved = False
        if ctx.is_main or validate_everywhere:
            if missing_rate is not None:
                val = evaluate_missing_rates(model, splits["val"], rates=[missing_rate], protocol=cfg.missing_protocol,
                                             batch_size=stage.batch_size, device=device, seed=cfg.seed)
            else:
                if stage.reseed_each_pass is not None:
                    torch.manual_seed(stage.reseed_each_pass)
                val = evaluate_model(model, splits["val"], num_classes=num_classes, conditions=val_conditions,
                                     device=device, corruption=stage.corruption,
                                     noise_steps=cfg.noise_steps, seed=cfg.seed,
                                     noise_padding=stage.noise_padding)
            metric = val["overall"][stage.select_metric]
            record["val"] = val["overall"]
            record["seconds"] = round(time.perf_counter() - epoch_start, 3)
            history.append(record)
            if stage.lr_policy == "plateau":
                lr_scheduler.step(metric)
            improved = better(metric, best_metric)
            if improved:
                best_metric, best_epoch, best_val = metric, epoch + 1, val
        if ctx.is_main:
            name = epoch_name(epoch + 1)
            save_weights(stage_dir / f"{name}.safetensors", model, {**metadata, "epoch": epoch + 1, "val": val})
            if improved:
                link_or_copy(stage_dir / f"{name}.safetensors", stage_dir / "best.safetensors")
            save_state(stage_dir / f"{name}.state.pt", {
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "epoch": epoch,
                "best_metric": best_metric,
                "best_epoch": best_epoch,
                "history": json.dumps(history),
                "best_val": json.dumps(best_val),
            })
            _write_json(latest, {"weights": f"{name}.safetensors", "state": f"{name}.state.pt", "epoch": epoch + 1})
            prune_epochs(stage_dir, cfg.keep_checkpoints, epoch + 1)
            if tracker is not None:
                tracker.epoch_end(stage.name, history)
            parts_text = " ".join(f"{k}={v:.4f}" for k, v in train_losses.items())
            seconds = record["seconds"]
            left = (total_epochs - epoch - 1) * seconds
            log(f"[{cfg.model}/{stage.name}] epoch {epoch + 1}/{total_epochs} {parts_text} "
                f"val {stage.select_metric}={metric:.4f} (best {best_metric:.4f} @ {best_epoch}) "
                f"{seconds:.1f} s" + (f", ~{_duration(left)} left in this stage" if left >= 1 else ""))
        ctx.barrier()

    if ctx.is_main and total_epochs > 0:
        _write_json(stage_dir / "done.json", {"best_epoch": best_epoch, "best_metric": best_metric, "val": best_val,
                                              "history": history})
        drop_states(stage_dir)
    ctx.barrier()
    # The next stage (and the final model) start from the selected epoch, not the last one.
    load_weights(stage_dir / "best.safetensors", model)
    return StageResult(stage.name, best_epoch, best_metric, best_val, history, time.perf_counter() - start_time)


def evaluate_split(model: torch.nn.Module, dataset: Any, cfg: TrainConfig, stage: Stage, *,
                   device: torch.device) -> dict[str, Any]:
    """The final evaluation of a trained model: the six missing conditions and full (utterance and dialogue data), or
    IMDer's missing-rate sweep ``cfg.eval_missing_rates`` (sequence data)."""
    if views_for(dataset).kind == "sequences":
        return evaluate_missing_rates(model, dataset, rates=list(cfg.eval_missing_rates),
                                      protocol=cfg.missing_protocol, batch_size=stage.batch_size, device=device,
                                      seed=cfg.seed)
    if stage.reseed_each_pass is not None:
        torch.manual_seed(stage.reseed_each_pass)
    return evaluate_model(model, dataset, num_classes=dataset.num_classes, conditions="six+full", device=device,
                          corruption=stage.corruption, noise_steps=cfg.noise_steps, seed=cfg.seed,
                          with_per_class=True, noise_padding=stage.noise_padding)


def load_data(spec: str, *, fold: int, seed: int, options: dict[str, Any]) -> dict[str, Any]:
    """:func:`~mmer_ext.data.load_dataset` with a bad option named as a config error (a loader's plain ValueError is
    about an argument; a file's problems are :class:`~mmer_ext.data.DataFormatError`s and pass unchanged)."""
    from mmer_ext.data import DataFormatError, load_dataset

    try:
        return load_dataset(spec, fold=fold, seed=seed, **options)
    except DataFormatError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data_options {dict(options)} do not fit data {spec!r}: {e}") from e


def fit(cfg: TrainConfig, *, splits: dict[str, Any] | None = None, teacher_checkpoint: str | Path | None = None,
        log: Callable[[str], None] | None = None) -> FitResult:
    """Train ``cfg.model`` on ``cfg.data`` (or the given ``splits``), evaluate on the test split, write ``out_dir``.

    ``teacher_checkpoint``: a ``model.safetensors`` of the first stage's model, trained before (the full-modality
    baseline for MMIN, say): the first stage is then loaded instead of trained.
    """
    # Everything that can be refused is checked before the first byte is written: a refused run leaves the run
    # directory as it was.
    validate(cfg)
    stages = resolve_stages(cfg)
    if splits is None:
        from mmer_ext.data import data_kind

        check_data_kind(cfg.model, cfg.data, data_kind(cfg.data))
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    out_dir = check_out_dir(cfg.out_dir)
    if splits is None:
        splits = load_data(cfg.data, fold=cfg.fold, seed=cfg.seed, options=cfg.data_options)
    for key in ("train", "val", "test"):
        if key not in splits or len(splits[key]) == 0:
            from mmer_ext.data import DataFormatError

            raise DataFormatError(f"data {cfg.data!r} has no (or an empty) {key!r} split; check its files or the "
                                  "data_options that size it")
    check_data_kind(cfg.model, cfg.data, views_for(splits["train"]).kind)
    _dry_build(stages, splits["train"])
    teacher = None
    if teacher_checkpoint is not None and len(stages) > 1:
        teacher, _ = load_model(teacher_checkpoint)
        if type(teacher) is not stages[0].model:
            raise CheckpointError(f"teacher checkpoint {str(teacher_checkpoint)!r} holds a {type(teacher).__name__}, "
                                  f"stage {stages[0].name!r} of {cfg.model} needs a {stages[0].model.__name__}")
    ctx = init_distributed(device)

    def check_stage_dirs() -> None:
        for index, stage in enumerate(stages):
            if cfg.resume and not (index == 0 and teacher is not None):
                stage_dir = out_dir / stage.name
                _check_stage_dir(stage_dir, _stage_fingerprint(cfg, stage), True)
                # The files a resume reads, read now: a broken one is refused before anything is written.
                if (stage_dir / "done.json").is_file():
                    _stage_done(stage_dir)
                elif (stage_dir / "latest.json").is_file():
                    _pointer(stage_dir / "latest.json")

    check_stage_dirs()
    with run_lock(out_dir) if ctx.is_main else contextlib.nullcontext():
        check_stage_dirs()  # again: another run may have changed them before the lock was ours
        return _fit(cfg, stages, splits, teacher, teacher_checkpoint, device, ctx, out_dir, log)


def _dry_build(stages: tuple[Stage, ...], train: Any) -> None:
    """Construct every stage's model on the meta device (no memory, no time) so that bad hyper-parameters are named
    before anything is written."""
    teacher = None
    with torch.device("meta"):
        for stage in stages:
            kwargs = {**data_kwargs(stage.model, train), **stage.hparams}
            if teacher is not None:
                kwargs["teacher"] = teacher
            try:
                teacher = stage.model(train.dims, train.num_classes, **kwargs)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"hparams.{stage.name}: {stage.model.__name__} rejects them: {e}") from e
            except (NotImplementedError, RuntimeError):
                return  # a constructor that needs real data cannot run on meta; the real build reports its errors


def _fit(cfg: TrainConfig, stages: tuple[Stage, ...], splits: dict[str, Any], teacher: torch.nn.Module | None,
         teacher_checkpoint: str | Path | None, device: torch.device, ctx: DistContext, out_dir: Path,
         log: Callable[[str], None] | None) -> FitResult:
    say = log or (lambda msg: tqdm.write(msg))
    log_fn = say if ctx.is_main else (lambda msg: None)
    train = splits["train"]
    dims, num_classes, class_names = train.dims, train.num_classes, train.class_names

    tracker = RunTracker(out_dir, tensorboard=cfg.tensorboard) if ctx.is_main else None
    plan = make_plan(cfg, stages, splits, world_size=ctx.world_size, device=device,
                     teacher_checkpoint=teacher_checkpoint, tensorboard=tracker is not None and tracker.use_tensorboard)
    for line in format_plan(plan):
        log_fn(line)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(out_dir / "run.json", {
            "config": config_to_dict(cfg),
            "stages": [{**asdict(s), "model": s.model.__name__} for s in stages],
            "dims": list(dims), "num_classes": num_classes, "class_names": list(class_names),
            "sizes": {k: len(v) for k, v in splits.items()}, "world_size": ctx.world_size,
            "plan": plan, "environment": run_environment(device),
        })
    ctx.barrier()
    try:
        return _fit_stages(cfg, stages, splits, out_dir, device=device, ctx=ctx, log_fn=log_fn, tracker=tracker,
                           teacher=teacher, teacher_checkpoint=teacher_checkpoint)
    finally:
        if tracker is not None:
            tracker.close()


def _fit_stages(cfg: TrainConfig, stages: tuple[Stage, ...], splits: dict[str, Any], out_dir: Path, *,
                device: torch.device, ctx: DistContext, log_fn: Callable[[str], None], tracker: RunTracker | None,
                teacher: torch.nn.Module | None, teacher_checkpoint: str | Path | None) -> FitResult:
    train = splits["train"]
    dims, num_classes, class_names = train.dims, train.num_classes, train.class_names

    results: list[StageResult] = []
    models: list[torch.nn.Module] = []
    for index, stage in enumerate(stages):
        # Each stage is built only once its teacher is trained: a student freezes the teacher it is given and copies
        # its encoders at construction.
        torch.manual_seed(_derive_seed(cfg.seed, index))
        kwargs = {**data_kwargs(stage.model, train), **stage.hparams}
        if models:
            kwargs["teacher"] = models[-1]
        try:
            model = stage.model(dims, num_classes, **kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"hparams.{stage.name}: {stage.model.__name__} rejects them: {e}") from e
        models.append(model)
        stage_dir = out_dir / stage.name
        metadata = _model_metadata(cfg, stages, index, dims, num_classes, class_names,
                                   data_kw=data_kwargs(stage.model, train))
        if index == 0 and teacher is not None:
            source = teacher
            if type(source) is not type(model):
                raise CheckpointError(f"teacher checkpoint {str(teacher_checkpoint)!r} holds a {type(source).__name__}, "
                                      f"stage {stage.name!r} of {cfg.model} needs a {type(model).__name__}")
            model.load_state_dict(source.state_dict())
            log_fn(f"[{cfg.model}/{stage.name}] loaded from {teacher_checkpoint}")
            results.append(StageResult(stage.name, -1, math.nan, {}))
            continue
        _claim_stage_dir(stage_dir, _stage_fingerprint(cfg, stage), cfg.resume, ctx)
        done = _stage_done(stage_dir) if cfg.resume else None
        if done is not None:
            load_weights(stage_dir / "best.safetensors", model)
            log_fn(f"[{cfg.model}/{stage.name}] already trained (best epoch {done['best_epoch']}); loaded")
            if tracker is not None:
                tracker.stage_loaded(stage.name, (stage.select_metric, stage.select_mode), done["history"])
            results.append(StageResult(stage.name, done["best_epoch"], done["best_metric"], done["val"], done["history"]))
        else:
            results.append(train_stage(stage, index, model, splits, cfg, stage_dir, device=device, ctx=ctx,
                                       num_classes=num_classes, metadata=metadata, log=log_fn, tracker=tracker))

    final = models[-1]
    metadata = _model_metadata(cfg, stages, len(stages) - 1, dims, num_classes, class_names,
                               {"val": results[-1].val_metrics, "best_epoch": results[-1].best_epoch,
                                "epoch": results[-1].best_epoch},
                               data_kw=data_kwargs(stages[-1].model, train))
    test_metrics = None
    if ctx.is_main:
        save_weights(out_dir / "model.safetensors", final, metadata)
        last_best = out_dir / stages[-1].name / "best.safetensors"
        if last_best.is_file():
            # The same weights: one file on disk for every name they have (the final metadata is a superset), the
            # best epoch's own file included when it is still kept.
            twins = [p for p in last_best.parent.glob("epoch-*.safetensors") if os.path.samefile(p, last_best)]
            for name in (last_best, *twins):
                link_or_copy(out_dir / "model.safetensors", name)
        test_metrics = evaluate_split(final, splits["test"], cfg, stages[-1], device=device)
        _write_json(out_dir / "test_metrics.json", {"corruption": stages[-1].corruption, "metrics": test_metrics,
                                                    "stages": [asdict(r) for r in results]})
        if "confusion" in test_metrics:
            from mmer_ext.report import plot_confusion_matrices

            plot_confusion_matrices(out_dir / "confusion_matrices.png", test_metrics["confusion"], class_names,
                                    title=f"{cfg.model}: test confusion per condition (rows: true class)")
        if tracker is not None:
            tracker.write_csv()
            curves = tracker.finish()
            if curves is not None:
                log_fn(f"wrote {out_dir / 'metrics.csv'} and {curves}")
    ctx.barrier()
    return FitResult(out_dir, final, results, test_metrics, metadata)

