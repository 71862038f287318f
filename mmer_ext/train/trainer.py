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
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from mmer_ext.models.recipes import RECIPES, Stage
from mmer_ext.train.checkpoint import CheckpointError, load_weights, read_weights_metadata, save_weights
from mmer_ext.train.config import CORRUPTIONS, ConfigError, TrainConfig, config_to_dict, load_config, validate
from mmer_ext.train.distributed import DistContext, init_distributed, resolve_device
from mmer_ext.train.evaluation import to_device
from mmer_ext.train.optim import StageOptimizer, make_optimizer, selection_for
from mmer_ext.train.plan import format_plan, make_plan
from mmer_ext.train.retention import link_or_copy
from mmer_ext.train.rundir import check_out_dir, run_lock
from mmer_ext.seeding import derive_seed
from mmer_ext.train.stage_data import StageData, evaluate_split, stage_data
from mmer_ext.train.stage_dir import (
    StageProgress,
    check_stage_dir,
    claim_stage_dir,
    finish_stage,
    latest_pointer,
    resume_progress,
    save_epoch,
    stage_done,
    stage_fingerprint,
    write_json,
)
from mmer_ext.train.tracking import RunTracker, run_environment
from mmer_ext.train.views import check_data_kind, views_for

__all__ = ["fit", "FitResult", "resolve_stages", "build_models", "load_model", "train_stage", "evaluate_split"]

FORMAT_VERSION = 1


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


def _sampler_hparams(cfg: TrainConfig, stage: Stage) -> dict[str, Any]:
    """``--sampler`` / ``--steps`` as constructor arguments of the models that sample (IMDer)."""
    params = inspect.signature(stage.model).parameters
    out: dict[str, Any] = {}
    if cfg.sampler is not None and "sampler" in params:
        out["sampler"] = cfg.sampler
    if cfg.sampler_steps is not None and "steps" in params:
        out["steps"] = cfg.sampler_steps
    if cfg.sampler_eta is not None and "sampler_kwargs" in params:
        sampler = cfg.sampler if cfg.sampler is not None else stage.hparams.get("sampler", params["sampler"].default)
        if sampler != "ddim":
            raise ConfigError(f"--eta is DDIM's noise share; it needs --sampler ddim (the sampler is {sampler!r})")
        out["sampler_kwargs"] = {**stage.hparams.get("sampler_kwargs", {}), "eta": cfg.sampler_eta}
    return out


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


def _train_epoch(step_module: torch.nn.Module, model: torch.nn.Module, data: StageData, opt: StageOptimizer,
                 device: torch.device, bar: Any, stage: Stage, epoch: int) -> dict[str, float]:
    """One epoch of optimiser steps; the mean of each loss part over its batches."""
    model.train()
    sums: dict[str, float] = {}
    count = 0
    clip = getattr(model, "clip_grad_norm", None) or getattr(model, "clip_grad_value", None)
    for batch in data.batches(bar):
        loss, parts = step_module(to_device(batch, device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"[{stage.name}] loss became {loss.item()} at epoch {epoch + 1}; parts: "
                                     + ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items()))
        opt.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            # Per network (A, V, L encoders, AE, classifier ...) like the authors, where the model knows its nets.
            if hasattr(model, "clip_gradients_"):
                model.clip_gradients_()
            else:
                torch.nn.utils.clip_grad_norm_(opt.params, clip)
        opt.optimizer.step()
        if hasattr(model, "after_optimizer_step"):
            model.after_optimizer_step()  # e.g. IMDer's EMA of the score weights
        count += 1
        for k, v in {"loss": loss.detach(), **parts}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return {k: v / max(count, 1) for k, v in sums.items()}


def train_stage(stage: Stage, stage_index: int, model: torch.nn.Module, splits: dict[str, Any], cfg: TrainConfig,
                stage_dir: Path, *, device: torch.device, ctx: DistContext, num_classes: int,
                metadata: dict[str, Any], log: Callable[[str], None], tracker: RunTracker | None = None) -> StageResult:
    """Train one stage: per epoch, re-seed, one pass of optimiser steps, validation, a checkpoint; then load the
    selected epoch's weights into ``model``. The pieces: ``stage_data`` (batches and validation for the kind of data),
    ``optim`` (optimiser, LR policy, selection), ``stage_dir`` (checkpoints and exact resumption)."""
    start_time = time.perf_counter()
    total_epochs = stage.epochs + stage.epochs_decay
    data = stage_data(splits, cfg, stage, stage_index, ctx)
    model.to(device)
    opt = make_optimizer(model, stage)
    selection = selection_for(stage)
    step_module: torch.nn.Module = _LossModule(model)
    if ctx.enabled:
        step_module = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)

    progress = resume_progress(stage_dir, model, opt, selection.worst) if cfg.resume else None
    if progress is not None:
        log(f"[{stage.name}] resuming after epoch {progress.first_epoch} from {stage_dir}")
    else:
        progress = StageProgress(first_epoch=0, best_metric=selection.worst)
    if tracker is not None:
        tracker.stage_started(stage.name, (stage.select_metric, stage.select_mode), progress.history)
    # Plateau LR and early stopping act on the validation metric, so with them every rank validates (the result is
    # deterministic, hence the same everywhere); otherwise only the main rank does.
    validate_everywhere = stage.lr_policy == "plateau" or stage.early_stop is not None

    for epoch in range(progress.first_epoch, total_epochs):
        if stage.early_stop is not None and progress.best_epoch > 0 and epoch + 1 - progress.best_epoch > stage.early_stop:
            log(f"[{cfg.model}/{stage.name}] early stop: no better validation {stage.select_metric} "
                f"for {stage.early_stop} epochs (best @ {progress.best_epoch})")
            break
        epoch_start = time.perf_counter()
        # reseed_each_pass (MMGCN's authors): one fixed seed at every pass, so every epoch repeats the same data
        # order, dropout masks and noise; otherwise each epoch has its own stream.
        pass_epoch = 0 if stage.reseed_each_pass is not None else epoch
        torch.manual_seed(stage.reseed_each_pass if stage.reseed_each_pass is not None
                          else derive_seed(cfg.seed, stage_index, epoch))
        data.start_epoch(epoch, pass_epoch)
        bar = tqdm(data.loader, desc=f"{cfg.model}/{stage.name} {epoch + 1}/{total_epochs}", leave=False,
                   disable=(not cfg.progress) or (not ctx.is_main) or None, dynamic_ncols=True)
        train_losses = _train_epoch(step_module, model, data, opt, device, bar, stage, epoch)
        opt.after_training()

        record: dict[str, Any] = {"epoch": epoch + 1, "train": train_losses, "lr": opt.lr}
        val, improved = None, False
        if ctx.is_main or validate_everywhere:
            val = data.validate(model, device, num_classes)
            metric = val["overall"][stage.select_metric]
            record["val"] = val["overall"]
            record["seconds"] = round(time.perf_counter() - epoch_start, 3)
            progress.history.append(record)
            opt.after_validation(metric)
            improved = selection.better(metric, progress.best_metric)
            if improved:
                progress.best_metric, progress.best_epoch, progress.best_val = metric, epoch + 1, val
        if ctx.is_main:
            save_epoch(stage_dir, epoch, model, opt, progress, metadata=metadata, val=val, improved=improved,
                       keep=cfg.keep_checkpoints)
            if tracker is not None:
                tracker.epoch_end(stage.name, progress.history)
            _log_epoch(log, cfg, stage, epoch, total_epochs, train_losses, metric, progress, record["seconds"])
        ctx.barrier()

    if ctx.is_main and total_epochs > 0:
        finish_stage(stage_dir, progress)
    ctx.barrier()
    # The next stage (and the final model) start from the selected epoch, not the last one.
    load_weights(stage_dir / "best.safetensors", model)
    return StageResult(stage.name, progress.best_epoch, progress.best_metric, progress.best_val, progress.history,
                       time.perf_counter() - start_time)


def _log_epoch(log: Callable[[str], None], cfg: TrainConfig, stage: Stage, epoch: int, total_epochs: int,
               train_losses: dict[str, float], metric: float, progress: StageProgress, seconds: float) -> None:
    parts_text = " ".join(f"{k}={v:.4f}" for k, v in train_losses.items())
    left = (total_epochs - epoch - 1) * seconds
    log(f"[{cfg.model}/{stage.name}] epoch {epoch + 1}/{total_epochs} {parts_text} "
        f"val {stage.select_metric}={metric:.4f} (best {progress.best_metric:.4f} @ {progress.best_epoch}) "
        f"{seconds:.1f} s" + (f", ~{_duration(left)} left in this stage" if left >= 1 else ""))


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
                check_stage_dir(stage_dir, stage_fingerprint(cfg, stage), True)
                # The files a resume reads, read now: a broken one is refused before anything is written.
                if (stage_dir / "done.json").is_file():
                    stage_done(stage_dir)
                elif (stage_dir / "latest.json").is_file():
                    latest_pointer(stage_dir / "latest.json")

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
        write_json(out_dir / "run.json", {
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
        torch.manual_seed(derive_seed(cfg.seed, index))
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
        claim_stage_dir(stage_dir, stage_fingerprint(cfg, stage), cfg.resume, ctx)
        done = stage_done(stage_dir) if cfg.resume else None
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
        write_json(out_dir / "test_metrics.json", {"corruption": stages[-1].corruption, "metrics": test_metrics,
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

