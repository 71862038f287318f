"""How one stage trains and validates on its kind of data — the only place the trainer's loop meets the kinds.

Utterance and dialogue data (the MMIN family, MMGCN) train on a protocol view whose missing modalities are zeroed or
noised per batch and validate under the missing conditions; sequence data (IMDer) draws its missing patterns per
epoch from the missing-rate protocol and validates at the stage's missing rate. ``stage_data`` picks the class from
the split's data views; ``evaluate_split`` does the same for the final test evaluation.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

from mmer_ext.data import NoiseScheduler, missing_rate_patterns
from mmer_ext.models.recipes import Stage
from mmer_ext.train.config import TrainConfig
from mmer_ext.train.distributed import DistContext
from mmer_ext.train.evaluation import evaluate_missing_rates, evaluate_model, with_missing_patterns
from mmer_ext.seeding import derive_seed
from mmer_ext.train.views import STAGE_DATA_MODES, views_for

__all__ = ["stage_missing_rate", "StageData", "ConditionStageData", "MissingRateStageData", "stage_data",
           "evaluate_split"]


def stage_missing_rate(cfg: TrainConfig, stage: Stage) -> float:
    # IMDer's first stage pretrains on complete data (MR 0); the second trains at the configured MR.
    return 0.0 if stage.data == "complete" else cfg.missing_rate


class StageData:
    """The training loader of one stage (a DistributedSampler over the protocol view, ``repeats`` passes per epoch)
    and its per-epoch corruption and validation, which subclasses define per kind of data."""

    def __init__(self, splits: dict[str, Any], cfg: TrainConfig, stage: Stage, stage_index: int, ctx: DistContext):
        self.splits, self.cfg, self.stage, self.stage_index = splits, cfg, stage, stage_index
        self.views = views_for(splits["train"])
        self.base_view = self.views.make(splits["train"], STAGE_DATA_MODES[stage.data], cfg.seed)
        # `repeats` passes over the data make one epoch (one validation and checkpoint per `repeats` passes).
        train_view = (self.base_view if stage.repeats == 1
                      else torch.utils.data.ConcatDataset([self.base_view] * stage.repeats))
        if stage.batch_size % ctx.world_size:
            raise ValueError(f"batch_size {stage.batch_size} must be divisible by the number of processes "
                             f"{ctx.world_size}")
        self.sampler = DistributedSampler(train_view, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                          seed=derive_seed(cfg.seed, stage_index), drop_last=False)
        self.loader = DataLoader(train_view, batch_size=stage.batch_size // ctx.world_size, sampler=self.sampler,
                                 collate_fn=self.views.collate, num_workers=cfg.num_workers)

    def start_epoch(self, epoch: int, pass_epoch: int) -> None:
        """Position the data order (and the view's per-epoch draws) at ``pass_epoch``."""
        if hasattr(self.base_view, "set_epoch"):
            self.base_view.set_epoch(pass_epoch)
        self.sampler.set_epoch(pass_epoch)

    def batches(self, loader: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The epoch's batches with their missing modalities applied."""
        raise NotImplementedError

    def validate(self, model: torch.nn.Module, device: torch.device, num_classes: int) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def evaluate(model: torch.nn.Module, dataset: Any, cfg: TrainConfig, stage: Stage, *,
                 device: torch.device) -> dict[str, Any]:
        raise NotImplementedError


class ConditionStageData(StageData):
    """Utterances and dialogues: the missing modalities of each item are zeroed or noised as the stage says."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        stage = self.stage
        self.noise = NoiseScheduler(num_steps=self.cfg.noise_steps) if stage.corruption != "zero" else None
        # Only a noising recipe that asks for it gets ``noise_padding``: the dialogue views' corruption has no such
        # argument.
        self.noise_options = {"noise_padding": True} if stage.noise_padding and stage.corruption != "zero" else {}
        self.generator = torch.Generator()

    def start_epoch(self, epoch: int, pass_epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(derive_seed(self.cfg.seed, self.stage_index, pass_epoch, 1))
        super().start_epoch(epoch, pass_epoch)

    def batches(self, loader: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for batch in loader:
            yield self.views.corrupt(batch, mode=self.stage.corruption, scheduler=self.noise,
                                     generator=self.generator, **self.noise_options)

    def validate(self, model: torch.nn.Module, device: torch.device, num_classes: int) -> dict[str, Any]:
        stage = self.stage
        if stage.reseed_each_pass is not None:
            torch.manual_seed(stage.reseed_each_pass)
        conditions = "full" if STAGE_DATA_MODES[stage.data] == "full" else "six"
        return evaluate_model(model, self.splits["val"], num_classes=num_classes, conditions=conditions,
                              device=device, corruption=stage.corruption, noise_steps=self.cfg.noise_steps,
                              seed=self.cfg.seed, noise_padding=stage.noise_padding)

    @staticmethod
    def evaluate(model: torch.nn.Module, dataset: Any, cfg: TrainConfig, stage: Stage, *,
                 device: torch.device) -> dict[str, Any]:
        if stage.reseed_each_pass is not None:
            torch.manual_seed(stage.reseed_each_pass)
        return evaluate_model(model, dataset, num_classes=dataset.num_classes, conditions="six+full", device=device,
                              corruption=stage.corruption, noise_steps=cfg.noise_steps, seed=cfg.seed,
                              with_per_class=True, noise_padding=stage.noise_padding)


class MissingRateStageData(StageData):
    """IMDer's sequences: which modalities a row misses comes from the missing-rate protocol, drawn once per epoch
    over the loader's order; missing modalities are zeroed."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.missing_rate = stage_missing_rate(self.cfg, self.stage)
        self.patterns: torch.Tensor | None = None

    def start_epoch(self, epoch: int, pass_epoch: int) -> None:
        super().start_epoch(epoch, pass_epoch)
        self.patterns = missing_rate_patterns(
            len(self.sampler), self.missing_rate, protocol=self.cfg.missing_protocol,
            batch_size=self.loader.batch_size,
            generator=torch.Generator().manual_seed(derive_seed(self.cfg.seed, self.stage_index, epoch, 2)))

    def batches(self, loader: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        size = self.loader.batch_size
        for index, batch in enumerate(loader):
            yield with_missing_patterns(batch, self.patterns[index * size:][: batch["A"].shape[0]])

    def validate(self, model: torch.nn.Module, device: torch.device, num_classes: int) -> dict[str, Any]:
        return evaluate_missing_rates(model, self.splits["val"], rates=[self.missing_rate],
                                      protocol=self.cfg.missing_protocol, batch_size=self.stage.batch_size,
                                      device=device, seed=self.cfg.seed)

    @staticmethod
    def evaluate(model: torch.nn.Module, dataset: Any, cfg: TrainConfig, stage: Stage, *,
                 device: torch.device) -> dict[str, Any]:
        return evaluate_missing_rates(model, dataset, rates=list(cfg.eval_missing_rates),
                                      protocol=cfg.missing_protocol, batch_size=stage.batch_size, device=device,
                                      seed=cfg.seed)


# The one mapping from a kind of data (its views) to how a stage uses it.
_BY_KIND: dict[str, type[StageData]] = {"utterances": ConditionStageData, "dialogues": ConditionStageData,
                                        "sequences": MissingRateStageData}


def stage_data(splits: dict[str, Any], cfg: TrainConfig, stage: Stage, stage_index: int,
               ctx: DistContext) -> StageData:
    return _BY_KIND[views_for(splits["train"]).kind](splits, cfg, stage, stage_index, ctx)


def evaluate_split(model: torch.nn.Module, dataset: Any, cfg: TrainConfig, stage: Stage, *,
                   device: torch.device) -> dict[str, Any]:
    """The final evaluation of a trained model: the six missing conditions and full (utterance and dialogue data), or
    IMDer's missing-rate sweep ``cfg.eval_missing_rates`` (sequence data)."""
    return _BY_KIND[views_for(dataset).kind].evaluate(model, dataset, cfg, stage, device=device)
