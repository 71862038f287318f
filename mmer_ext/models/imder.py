"""IMDer (Wang et al., NeurIPS 2023): incomplete multimodal learning with score-based diffusion recovery; github.com/mdswyz/IMDer.

Features of each modality go through a frozen temporal Conv1d projection to ``[B, d, T - 2]`` (d = 32, 48 steps for
MOSI's T = 50). For every missing modality a conditional score network (:class:`~mmer_ext.models.score_net.ScoreNet`,
one per modality) samples its projected features from the available ones, an RCAN-style network refines the sample,
and the MulT backbone (:class:`~mmer_ext.models.mult.MulT`) fuses the three sequences into the sentiment score.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mmer_ext.models.base import DATA_ORDER, MERModel
from mmer_ext.models.mult import MulT
from mmer_ext.models.score_net import CONDITION_NOISE, FrameScoreNet, ScoreNet, dsm_loss
from mmer_ext.sampling import SAMPLERS, sample

__all__ = ["IMDer", "OBJECTIVES", "RCANGroup", "RecoveryRefiner"]

_PAIRS = ("AV", "AL", "VL")
#: What :meth:`IMDer.training_loss` optimises: the recognition task with recovery ("task"), or only the score
#: networks (and the pair fusions) on every present modality of every row ("score": the score-pretraining stage).
OBJECTIVES = ("task", "score")
#: The score network of every modality: the authors' sequence U-Net ("unet", :class:`ScoreNet`) or the package's
#: per-frame model ("frame", :class:`FrameScoreNet`, the default; see IMDer's notes).
SCORE_NETS = ("frame", "unet")


def _run_sampler(name: str, score_fn: Callable, cond: Tensor, **kw) -> Tensor:
    # One seam for every sampler call of the model (tests count and inspect the calls here).
    return sample(name, score_fn, cond, **kw)


def _load_local_bert(path: str) -> nn.Module:
    try:
        from transformers import AutoModel
    except ImportError as err:
        raise ImportError("IMDer: text_encoder needs the 'transformers' package: pip install 'mmer_ext[bert]'") from err
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"IMDer: text_encoder {path!r} is not a directory with a transformers config.json "
                                "(a local BERT model is required; nothing is downloaded)")
    return AutoModel.from_pretrained(path, local_files_only=True)


class _ChannelAttention(nn.Module):
    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(nn.Conv1d(channels, hidden, 1), nn.ReLU(), nn.Conv1d(hidden, channels, 1),
                                  nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x.mean(dim=-1, keepdim=True))


class _RCAB(nn.Module):
    """Residual channel-attention block: ``x + CA(conv3(relu(conv3(x))))``."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv1d(channels, channels, 3, padding=1), _ChannelAttention(channels, reduction))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class RCANGroup(nn.Module):
    """Residual group of RCAN (Zhang et al., ECCV 2018) in 1-D: ``num_blocks`` RCABs and a conv3, plus the input."""

    def __init__(self, channels: int, num_blocks: int = 20, reduction: int = 16) -> None:
        super().__init__()
        if num_blocks < 0:
            raise ValueError(f"RCANGroup: num_blocks must be >= 0, got {num_blocks}")
        self.body = nn.Sequential(*[_RCAB(channels, reduction) for _ in range(num_blocks)],
                                  nn.Conv1d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class RecoveryRefiner(nn.Sequential):
    """IMDer's refinement of a sampled modality: ``Conv1d(d -> 2d, 1)``, :class:`RCANGroup` (2d),
    ``Conv1d(2d -> d, 1)``.

    ``residual=True``: ``x + body(x)`` with the last conv initialised to zero, so an untrained refiner passes the
    sample through unchanged. ``residual=False``: ``body(x)`` with PyTorch's default init, the authors' ``rec_l`` /
    ``rec_v`` / ``rec_a`` (a plain ``nn.Sequential``), which starts as a random map of the sample.
    """

    def __init__(self, d: int, num_blocks: int = 20, reduction: int = 16, residual: bool = True) -> None:
        super().__init__(nn.Conv1d(d, 2 * d, 1), RCANGroup(2 * d, num_blocks, reduction), nn.Conv1d(2 * d, d, 1))
        self.residual = bool(residual)
        if self.residual:
            nn.init.zeros_(self[2].weight)
            nn.init.zeros_(self[2].bias)

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return x + out if self.residual else out

    def extra_repr(self) -> str:
        return f"residual={self.residual}"


def _dims(dims) -> tuple[int, int, int]:
    try:
        out = tuple(int(d) for d in dims)
    except TypeError:
        out = ()
    if len(out) != 3 or min(out) < 1:
        raise ValueError(f"IMDer: dims must be three positive feature sizes (A, V, L), got {dims!r}")
    return out  # type: ignore[return-value]


class IMDer(MERModel):
    """IMDer: MulT recognition with score-based recovery of the missing modalities.

    Pipeline for a batch ``{"A", "V", "L": [B, T, D_m], "label": [B], "missing_index": [B, 3]}``:

    1. ``p_m = proj_m(x_m)``: Conv1d(D_m -> d, k=3, no bias), channel first ``[B, d, T - 2]``.
    2. For each modality ``m`` and the rows where it is missing (``missing_index[:, m] == 0``; A, V, L columns,
       1 = present; without the key every modality is present), a condition from that row's available modalities:
       the projection itself when one is available, ``fuse_{pair}(cat(p_i, p_j))`` (a trainable Conv1d(2d -> d, 1),
       one per pair, concatenated in A, V, L order) when two are. All rows missing ``m`` are recovered together:
       training adds ``dsm_loss(score_m, p_m, cond)`` (the true projection is the target); the configured sampler
       draws ``x ~ p(p_m | cond)`` without gradient; ``refine_m`` (:class:`RecoveryRefiner`) maps the sample to the
       recovered features and ``L_rec`` is their mean squared error to the true projection. The recovered rows
       replace ``p_m`` before fusion; the model never reads a missing modality's features except as these targets.
    3. ``MulT(p_A, p_V, p_L)`` -> ``[B]`` (regression, ``num_classes=1``) or ``[B, C]`` logits.

    Loss: ``L1(pred, label) + 0.1 * (sum_m score_m + rec)`` (cross-entropy instead of L1 when ``num_classes > 1``).

    Two stages, as the authors train it: ``IMDer(dims)`` is the complete-data pretraining model (projections
    trainable; with every modality present no recovery runs and the loss is the L1 term);
    ``IMDer(dims, teacher=pretrained, ...)`` copies the pretrained weights (same architecture arguments required)
    and freezes the projections, then trains on missing data. The package's recipes add a score-pretraining stage
    between the two (``objective="score"``, a student of the pretrained model too).

    Parameters
    ----------
    dims : ModalityDims or (A, V, L)
        Input feature sizes; text enters as precomputed features (768 for BERT-base features).
    num_classes : int
        1 = regression (the authors' MOSI / MOSEI setting).
    teacher : IMDer, optional
        The pretrained stage-1 model (see above).
    d_model, nlevels, num_heads : int
        MulT width (32), cross-modal layers (4; MOSEI 6) and heads (8).
    attn_dropout, attn_dropout_a, attn_dropout_v, relu_dropout, res_dropout, embed_dropout, out_dropout,
    text_dropout : float
        Dropouts; defaults are the authors' MOSI configuration (0, 0.2, 0, 0, 0, 0.2, 0, 0).
    proj_kernel : int
        Kernel of the temporal projections (3, no padding).
    score_channels, score_heads, score_layers, score_embed_dim : sequence of int, int, int, int
        Score-network widths (32, 64, 128, 256), heads (8), cross-attention layers (2), time embedding (256).
    score_cond_skip : bool
        Add the condition to the score net's features at every level besides the cross-attention
        (:class:`~mmer_ext.models.score_net.ScoreNet`'s ``cond_skip``; False: the authors' net).
        The ``score_channels`` ... ``score_cond_skip`` options apply to ``score_net="unet"`` only.
    score_net : {"frame", "unet"}
        The score network: ``"frame"`` (default), :class:`~mmer_ext.models.score_net.FrameScoreNet`, a residual
        MLP per step reading a window of the condition; ``"unet"``, the authors' sequence U-Net
        (:class:`~mmer_ext.models.score_net.ScoreNet`; recipe ``imder-authors``).
    score_hidden, score_depth, score_window : int
        The frame score net's width (256), residual blocks (3) and condition window in steps (5, odd).
    rcab_blocks, rcab_reduction : int
        RCAN blocks (20) and channel-attention reduction (16) of each refiner.
    refine_residual : bool
        True (default): each refiner is residual and starts as the identity (:class:`RecoveryRefiner`); False: the
        authors' plain refiner (recipe ``imder-authors``, converted checkpoints). See the differences below.
    sampler, steps, sigma, sampler_kwargs : str, int, float, dict
        Sampler of :mod:`mmer_ext.sampling` ("em": the authors' Euler–Maruyama), its steps (100), the VE SDE's
        sigma (25) and extra sampler options (e.g. ``snr`` for "pc"); change them later with :meth:`set_sampler`.
    score_weight : float
        0.1, the weight of ``score + rec``.
    clip_grad_value : float or None
        Gradient clipping by value (1.0; MOSEI 0.6), applied by :meth:`clip_gradients_`.
    text_encoder : str, optional
        A local directory holding a BERT model in the ``transformers`` format (``config.json`` + weights; nothing is
        downloaded). The text then enters as the tokenised ``batch["text_bert"]`` ``[B, 3, T]`` (input ids,
        attention mask, token type ids, as in MMSA's pickles, ``load_mmsa(..., use_bert=True)``) and the frozen
        encoder's last hidden states replace ``batch["L"]``, as the authors' BERT-base; ``dims.L`` must equal its
        hidden size. Needs the ``bert`` extra (``pip install 'mmer_ext[bert]'``).
    condition_noise : {"clean", "shared", "independent"}
        How the condition is perturbed, in the score-matching loss (:func:`~mmer_ext.models.score_net.dsm_loss`)
        and in the sampler alike. ``"clean"`` (default): never (the standard conditional diffusion: the score nets
        learn ``p(x_t | c)`` and sample from it). ``"shared"``: the authors' (training perturbs the condition with
        the same noise as the target, sampling re-noises it with fresh noise); see the differences below.
        ``"independent"``: training perturbs the condition with its own noise, sampling re-noises it (consistent,
        but the condition is blurred by the noise of each time).
    score_ema : float or None
        Decay of an exponential moving average of the score weights (0.999, warmed up over the first updates); the
        samplers read the average, as the score-SDE reference code evaluates its EMA. The trainer moves it after
        every optimizer step (:meth:`after_optimizer_step`). None: sample with the live weights (the authors').
    objective : {"task", "score"}
        ``"task"``: the recognition loss with recovery (above). ``"score"``: only the score networks and the pair
        fusions, on every present modality of every row (:meth:`score_pretraining_loss`) -- the recipe's
        score-pretraining stage on complete data, which gives the score nets the thousands of steps they need
        (the missing-data stage alone gives them a few dozen, on the missing rows only).

    Differences from the authors' code
    ----------------------------------
    * **The condition is clean by default** (``condition_noise="clean"``), the authors' is ``"shared"``. Their
      training perturbs the condition with the same noise as the target, ``c_t = c + std(t) z``, so
      ``c_t - x_t = c - x`` at every ``t``, while their sampler re-noises the condition with fresh noise: training
      and sampling disagree. Worse, the loss's optimum reads the condition with the wrong sign: for scalar
      zero-mean jointly Gaussian target and condition (variances ``a``, ``b``, covariance ``r``) the optimal score
      under shared noise is ``-((b - r) x_t + (a - r) c_t) / det``, ``det = (a + s^2)(b + s^2) - (r + s^2)^2``,
      ``s = std(t)``: with ``r > 0`` a larger condition pushes the sample *down*, whereas the true conditional
      score ``-(x_t - r c / b) / (a - r^2 / b + s^2)`` pushes it up. Sampled with the authors' 100-step sampler that
      gives correlation -0.24 with the truth where an exact posterior sample has +0.36 (``a = b = 1``,
      ``r = 0.6``); ``python_tests/sampling/test_conditional_gaussian.py`` shows it with trained nets. The
      authors' mode stays available (``condition_noise="shared"``, recipe ``imder-authors``); checkpoints written
      before this default changed load with ``"shared"``, what they were trained with.
    * **The score networks are per frame by default** (``score_net="frame"``), the authors' is a sequence U-Net
      (``"unet"``). Measured on the embedded data (``benchmarks/results/imder_score_diagnosis-*.md``): with the same
      400 steps, a U-Net's EM-100 sample reaches correlation 0.05 with the truth and spreads 2.6x too wide, the
      frame net 0.26 with the right spread (0.96x), the correlation of an exact posterior sample (r^2 = 0.26 for the
      ridge regressor's r); the U-Net has to learn a score over ``d x L`` dimensions from a few hundred sequences,
      the frame net sees every step as an example. Frames are sampled independently given the condition window.
      Checkpoints written before this default changed load with ``"unet"``.
    * **The refiners are residual and start as the identity by default** (``refine_residual=True``); the authors'
      ``rec_l`` / ``rec_v`` / ``rec_a`` are plain ``Conv1d -> RCAN group -> Conv1d`` stacks with PyTorch's random
      init, so an untrained refiner maps the sample to noise, and the missing-data stage (a few hundred steps here)
      does not train it back: on the embedded data it took the DDIM-10 recovery's correlation with the truth from
      0.28 (raw sample) to 0.10 and the regressor's from 0.55 to 0.18
      (``benchmarks/results/imder_recovery-cpu-1threads-2026-12-05.md``). Starting from the identity, training can
      only move the refiner where its reconstruction loss gains. Checkpoints written before this default changed
      load with ``False``.
    * Missingness is per sample: every row has its own pattern and all rows missing a modality are recovered in one
      sampler call (the authors draw one pattern per batch). The score and reconstruction terms of modality ``m`` sum
      the per-row losses of the rows missing ``m`` and divide by the batch size, so their expectation over batches
      matches the authors' per-batch means. The authors' per-batch protocol is a choice of the data side
      (:func:`mmer_ext.data.missing_rate_patterns` with ``protocol="per-batch"``): such a batch has one pattern for
      every row and then recovers exactly as theirs does.
    * Pair fusions concatenate their inputs in A, V, L order and MulT's head reads [A, V, L] (the authors: V|A, L|A,
      L|V and [L, A, V]): a relabelling of weights, which ``mmer-ext convert`` applies when it loads their checkpoints
      (:mod:`mmer_ext.models.imder_convert`). MulT's memory encoders take their inputs in the authors' order.
    * Missing rate 0 works: a batch with every modality present recovers nothing and adds no auxiliary loss (the
      authors' MR = 0 indexing makes every batch lose two modalities, IMDer#2, #6).
    * No device is hard-coded (the authors set a module-level ``device='cuda'``): everything follows the input's
      device, random numbers come from ``generator`` or the default generator of that device.
    * Sampling runs in the training forward too, as the authors do it, but the sampler and its step count are
      configurable (:meth:`set_sampler`); 100-step Euler–Maruyama is the default. For ten times fewer network
      calls, ``sampler="ddim", steps=10, sampler_kwargs={"eta": 0.5}`` (``--sampler ddim --steps 10 --eta 0.5``) is
      the few-step sampler ``benchmarks/imder_recovery.py`` measures against it: deterministic DDIM (``eta=0``) falls
      below EM-100's recovery correlation (the probability-flow path carries the score nets' errors), full ancestral
      noise (``eta=1``) at 10 steps pulls the samples towards the conditional mean.
    * The projections are trainable in the pretraining stage (the published code runs them under ``no_grad``
      always, which would leave them at their random initialisation; the pretraining script is not published,
      IMDer#5) and frozen in the second. The recovery branch uses them detached in both stages, so neither the score
      loss nor ``L_rec`` can shrink the targets they are measured against.
    * A projection is always applied (the authors skip it when a modality already has d features).
    * Text enters as precomputed features (``L`` of 768 for BERT-base) unless ``text_encoder`` names a local BERT.
    * Sinusoidal positions are given to every step (MulT treats steps whose first feature is exactly 0 as padding).
    """

    clip_grad_norm: float | None = None
    #: Constructor defaults that changed, with the value they had before: a saved configuration without one of these
    #: keys was written under the old value (``mmer_ext.train.load_model`` restores it; new files state the key).
    legacy_defaults = {"condition_noise": "shared", "score_ema": None, "score_net": "unet", "refine_residual": False}

    def __init__(
        self,
        dims,
        num_classes: int = 1,
        *,
        teacher: IMDer | None = None,
        d_model: int = 32,
        nlevels: int = 4,
        num_heads: int = 8,
        attn_dropout: float = 0.0,
        attn_dropout_a: float = 0.2,
        attn_dropout_v: float = 0.0,
        relu_dropout: float = 0.0,
        res_dropout: float = 0.0,
        embed_dropout: float = 0.2,
        out_dropout: float = 0.0,
        text_dropout: float = 0.0,
        proj_kernel: int = 3,
        score_channels: Sequence[int] = (32, 64, 128, 256),
        score_heads: int = 8,
        score_layers: int = 2,
        score_embed_dim: int = 256,
        score_cond_skip: bool = False,
        score_net: str = "frame",
        score_hidden: int = 256,
        score_depth: int = 3,
        score_window: int = 5,
        rcab_blocks: int = 20,
        rcab_reduction: int = 16,
        refine_residual: bool = True,
        sampler: str = "em",
        steps: int = 100,
        sigma: float = 25.0,
        sampler_kwargs: Mapping | None = None,
        score_weight: float = 0.1,
        clip_grad_value: float | None = 1.0,
        condition_noise: str = "clean",
        score_ema: float | None = 0.999,
        objective: str = "task",
        text_encoder: str | None = None,
    ) -> None:
        super().__init__()
        self.dims = _dims(dims)
        if int(num_classes) < 1:
            raise ValueError(f"IMDer: num_classes must be >= 1, got {num_classes}")
        if proj_kernel < 1:
            raise ValueError(f"IMDer: proj_kernel must be >= 1, got {proj_kernel}")
        if clip_grad_value is not None and clip_grad_value <= 0:
            raise ValueError(f"IMDer: clip_grad_value must be > 0 or None, got {clip_grad_value}")
        self.num_classes = int(num_classes)
        self.d_model = int(d_model)
        self.proj_kernel = int(proj_kernel)
        self.text_dropout = float(text_dropout)
        self.score_weight = float(score_weight)
        if condition_noise not in CONDITION_NOISE:
            raise ValueError(f"IMDer: condition_noise must be one of {CONDITION_NOISE}, got {condition_noise!r}")
        self.condition_noise = condition_noise
        self.sigma = float(sigma)
        if score_ema is not None and not 0.0 < float(score_ema) < 1.0:
            raise ValueError(f"IMDer: score_ema must be a decay in (0, 1) or None, got {score_ema}")
        self.score_ema_decay = None if score_ema is None else float(score_ema)
        if objective not in OBJECTIVES:
            raise ValueError(f"IMDer: objective must be one of {OBJECTIVES}, got {objective!r}")
        self.objective = objective
        self.clip_grad_value = None if clip_grad_value is None else float(clip_grad_value)
        self.set_sampler(sampler, steps, **dict(sampler_kwargs or {}))
        d = self.d_model
        proj = nn.ModuleDict({m: nn.Conv1d(dim, d, self.proj_kernel, bias=False)
                              for m, dim in zip(DATA_ORDER, self.dims)})
        self.fuse = nn.ModuleDict({pair: nn.Conv1d(2 * d, d, 1) for pair in _PAIRS})
        if score_net not in SCORE_NETS:
            raise ValueError(f"IMDer: score_net must be one of {SCORE_NETS}, got {score_net!r}")
        self.score_net = score_net

        def make_score_net() -> nn.Module:
            if score_net == "unet":
                return ScoreNet(d, None, d, widths=score_channels, embed_dim=score_embed_dim, num_heads=score_heads,
                                num_layers=score_layers, sigma=self.sigma, cond_skip=score_cond_skip)
            return FrameScoreNet(d, d, hidden=score_hidden, depth=score_depth, cond_window=score_window,
                                 sigma=self.sigma)

        self.score = nn.ModuleDict({m: make_score_net() for m in DATA_ORDER})
        if self.score_ema_decay is not None:
            # The sampler reads this average of the score weights (as the score-SDE reference code evaluates its EMA);
            # frozen: it moves only through after_optimizer_step(). Its update count warms the decay up.
            self.register_frozen("score_ema", copy.deepcopy(self.score))
            self.register_buffer("score_ema_updates", torch.zeros((), dtype=torch.long))
        self.refine = nn.ModuleDict({m: RecoveryRefiner(d, rcab_blocks, rcab_reduction, refine_residual)
                                     for m in DATA_ORDER})
        self.text_encoder = text_encoder
        self.bert = None
        if text_encoder is not None:
            bert = _load_local_bert(text_encoder)
            if bert.config.hidden_size != self.dims[2]:
                raise ValueError(f"IMDer: the text encoder at {text_encoder!r} has hidden size "
                                 f"{bert.config.hidden_size}, but dims.L is {self.dims[2]}")
            # Frozen as the authors run BERT (under no_grad); kept in the state_dict so a checkpoint is complete.
            self.register_frozen("bert", bert)
        self.fusion = MulT(d, num_heads, nlevels, output_dim=self.num_classes, attn_dropout=attn_dropout,
                           attn_dropout_a=attn_dropout_a, attn_dropout_v=attn_dropout_v, relu_dropout=relu_dropout,
                           res_dropout=res_dropout, embed_dropout=embed_dropout, out_dropout=out_dropout)
        if teacher is None:
            self.proj = proj
            self.stage = "pretrain"
        else:
            if not isinstance(teacher, IMDer):
                raise TypeError(f"IMDer: teacher must be an IMDer, got {type(teacher).__name__}")
            if teacher.dims != self.dims or teacher.num_classes != self.num_classes:
                raise ValueError(f"IMDer: teacher has dims {teacher.dims} / {teacher.num_classes} classes, the "
                                 f"student {self.dims} / {self.num_classes}")
            self.proj = proj
            state = teacher.state_dict()
            # A teacher without a score EMA (or a student without one) still hands over everything else; a new EMA
            # starts from the teacher's score weights.
            state = {k: v for k, v in state.items() if not k.startswith("score_ema")}
            if self.score_ema_decay is not None:
                source = teacher.score_ema if teacher.score_ema_decay is not None else teacher.score
                state.update({f"score_ema.{k}": v for k, v in source.state_dict().items()})
                state["score_ema_updates"] = (teacher.score_ema_updates if teacher.score_ema_decay is not None
                                              else torch.zeros((), dtype=torch.long))
            try:
                self.load_state_dict(state)
            except RuntimeError as err:
                raise ValueError("IMDer: the teacher's architecture differs from the student's (pass the same "
                                 f"architecture arguments): {err}") from None
            # Registered after the copy: a frozen module stays in eval mode and out of trainable_parameters().
            del self.proj
            self.register_frozen("proj", proj)
            self.stage = "missing"

    # ------------------------------------------------------------------ configuration
    def set_sampler(self, name: str, steps: int | None = None, **kwargs) -> None:
        """Use sampler ``name`` of :mod:`mmer_ext.sampling` (``"em"``, ``"pc"``, ``"ode"``, ``"ode-heun"``,
        ``"ddim"``) with ``steps`` steps (None keeps the current count) and extra options ``kwargs`` (replacing the
        previous ones)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"IMDer.set_sampler: name must be a sampler name, got {name!r}")
        if name not in SAMPLERS:
            raise ValueError(f"IMDer.set_sampler: unknown sampler {name!r}; one of {sorted(SAMPLERS)}")
        if "condition_noise" in kwargs:
            raise ValueError("IMDer.set_sampler: condition_noise is the model's (IMDer(condition_noise=...)), which "
                             "its score networks were trained with; the sampler follows it")
        if steps is None:
            steps = getattr(self, "steps", 100)
        if int(steps) < 1:
            raise ValueError(f"IMDer.set_sampler: steps must be >= 1, got {steps}")
        self.sampler, self.steps, self.sampler_kwargs = name, int(steps), dict(kwargs)

    def clip_gradients_(self, per_net: bool = True) -> Tensor | None:
        """Clip every trainable gradient to ``[-clip_grad_value, clip_grad_value]`` (the authors'
        ``clip_grad_value_``); returns the largest absolute gradient before clipping, None when not clipping.
        ``per_net`` is accepted for the base-class signature; clipping by value is elementwise either way."""
        if self.clip_grad_value is None:
            return None
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        if not grads:
            return None
        # One foreach call each instead of ~2 ops per parameter (~480 tensors): the same values as abs().max() and
        # clip_grad_value_'s clamp, a few ms less per training step on the CPU.
        with torch.no_grad():
            peak = torch.stack(torch._foreach_max(torch._foreach_abs(grads))).max()
            torch._foreach_clamp_max_(grads, self.clip_grad_value)
            torch._foreach_clamp_min_(grads, -self.clip_grad_value)
        return peak

    # ------------------------------------------------------------------ pieces
    def presence(self, batch: Mapping[str, Tensor]) -> Tensor:
        """``[B, 3]`` bool presence mask (A, V, L), validated: every row keeps at least one modality."""
        b = batch["A"].shape[0]
        mi = self.missing_index(batch)
        if mi.shape != (b, 3):
            raise ValueError(f"IMDer: missing_index must be [{b}, 3] (A, V, L; 1 = present), got {tuple(mi.shape)}")
        present = mi.to(device=batch["A"].device) != 0
        if b and not bool(present.any(dim=1).all()):
            raise ValueError("IMDer: missing_index has a row with every modality missing; at least one must be "
                             "present to recover the others")
        return present

    def encode_text(self, batch: Mapping[str, Tensor]) -> Tensor:
        """``[B, T, hidden]``: the frozen BERT over ``batch["text_bert"]`` (only with ``text_encoder``)."""
        tokens = batch.get("text_bert")
        if tokens is None:
            raise ValueError("IMDer: a model with a text_encoder reads batch['text_bert'] [B, 3, T] (ids, mask, "
                             "types); load the data with use_bert=True")
        if tokens.dim() != 3 or tokens.shape[1] != 3:
            raise ValueError(f"IMDer: batch['text_bert'] must be [B, 3, T], got {tuple(tokens.shape)}")
        tokens = tokens.to(device=batch["A"].device, dtype=torch.long)
        with torch.no_grad():
            out = self.bert(input_ids=tokens[:, 0], attention_mask=tokens[:, 1], token_type_ids=tokens[:, 2])
        return out.last_hidden_state.to(batch["A"].dtype)

    def project(self, x: Tensor, m: str) -> Tensor:
        """``[B, T, D_m] -> [B, d, T - proj_kernel + 1]``."""
        if x.dim() != 3 or x.shape[-1] != self.dims[DATA_ORDER.index(m)]:
            raise ValueError(f"IMDer: batch[{m!r}] must be [B, T, {self.dims[DATA_ORDER.index(m)]}], got "
                             f"{tuple(x.shape)}")
        if x.shape[1] < self.proj_kernel:
            raise ValueError(f"IMDer: batch[{m!r}] has {x.shape[1]} steps, fewer than proj_kernel={self.proj_kernel}")
        x = x.transpose(1, 2)
        if m == "L" and self.text_dropout:
            x = F.dropout(x, self.text_dropout, self.training)
        if "proj" in self._frozen_names:
            with torch.no_grad():
                return self.proj[m](x)
        return self.proj[m](x)

    def _condition(self, proj: Mapping[str, Tensor], present: Tensor, m: str) -> tuple[Tensor, Tensor]:
        """Rows missing ``m`` (ascending) and their conditions ``[n, d, L]``: the other modality's projection where
        only one is available, the pair's 1x1-conv fusion where both are."""
        rows = torch.nonzero(~present[:, DATA_ORDER.index(m)]).flatten()
        o1, o2 = (o for o in DATA_ORDER if o != m)
        has1 = present[rows, DATA_ORDER.index(o1)]
        has2 = present[rows, DATA_ORDER.index(o2)]
        p1, p2 = proj[o1][rows], proj[o2][rows]
        cond = torch.where(has1.view(-1, 1, 1), p1, p2)
        both = torch.nonzero(has1 & has2).flatten()
        if both.numel():
            cond = cond.index_copy(0, both, self.fuse[o1 + o2](torch.cat([p1[both], p2[both]], dim=1)))
        return rows, cond

    def sample_modality(self, m: str, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A raw sample (before the refiner) of modality ``m``'s projected features ``[n, d, L]`` given conditions
        ``cond`` ``[n, d, L]``, with the configured sampler and the score EMA (when kept)."""
        return self._sample(m, cond, generator)

    def _sample(self, m: str, cond: Tensor, generator: torch.Generator | None) -> Tensor:
        with torch.no_grad():
            nets = self.score_ema if self.score_ema_decay is not None else self.score
            return _run_sampler(self.sampler, nets[m], cond.detach(), steps=self.steps,
                                sigma=self.sigma, condition_noise=self.condition_noise, generator=generator,
                                **self.sampler_kwargs)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Move the score EMA towards the current score weights (the trainer calls this after every optimizer
        step). The decay warms up as ``min(decay, (1 + n) / (10 + n))`` over the ``n`` updates so far, so early
        averages do not drag the random initialisation along."""
        if self.score_ema_decay is None:
            return
        n = int(self.score_ema_updates)
        decay = min(self.score_ema_decay, (1.0 + n) / (10.0 + n))
        live = list(self.score.parameters())
        if any(p.requires_grad for p in live):
            torch._foreach_lerp_(list(self.score_ema.parameters()), live, 1.0 - decay)
        self.score_ema_updates += 1

    def score_pretraining_loss(self, batch: Mapping[str, Tensor],
                               generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The score-matching loss of every score network on every row where its modality is present, conditioned
        on a random non-empty subset of the row's other present modalities (one of: the first, the second, their
        fusion, each equally likely where both are present): what the score nets see at recovery time, learned from
        every complete sample instead of only the rows that happen to be missing. ``(loss, {"score_A", ...})``;
        the loss is the sum over modalities of the per-row mean. Subsets are drawn from ``generator`` (CPU or the
        batch's device) or the global RNG."""
        present = self.presence(batch)
        inputs = dict(zip(DATA_ORDER, self.inputs(batch)))
        if self.bert is not None:
            text = self.encode_text(batch)
            inputs["L"] = text * present[:, 2].view(-1, 1, 1).to(text.dtype)
        with torch.no_grad():
            feats = {m: self.project(inputs[m], m).detach() for m in DATA_ORDER}
        terms: dict[str, Tensor] = {}
        for j, m in enumerate(DATA_ORDER):
            rows = torch.nonzero(present[:, j]).flatten()
            o1, o2 = (DATA_ORDER.index(o) for o in DATA_ORDER if o != m)
            others = present[rows][:, [o1, o2]]
            usable = others.any(dim=1)
            rows, others = rows[usable], others[usable]
            if not rows.numel():
                continue
            # Per row: keep the first, the second or both of the present others (uniformly among what is possible).
            u = torch.rand(rows.numel(), generator=generator, device=generator.device if generator is not None
                           else present.device).to(present.device)
            both = others.all(dim=1)
            keep1 = torch.where(both, u < 2 / 3, others[:, 0])
            keep2 = torch.where(both, u >= 1 / 3, others[:, 1])
            sub = torch.ones(rows.numel(), 3, dtype=torch.bool, device=present.device)
            sub[:, j] = False
            sub[:, o1], sub[:, o2] = keep1, keep2
            view = {k: feats[k][rows] for k in DATA_ORDER}
            _, cond = self._condition(view, sub, m)
            terms[f"score_{m}"] = dsm_loss(self.score[m], view[m], cond, self.sigma, generator=generator,
                                           condition_noise=self.condition_noise)
        if not terms:
            raise ValueError("IMDer.score_pretraining_loss: no row has a modality together with another one")
        loss = torch.stack(list(terms.values())).sum()
        return loss, {k: v.detach() for k, v in terms.items()}

    def _run(self, batch: Mapping[str, Tensor], *, losses: bool, generator: torch.Generator | None = None,
             fill: Callable[[str, Tensor], Tensor] | None = None, refine: bool = True) -> dict:
        present = self.presence(batch)
        b = present.shape[0]
        inputs = dict(zip(DATA_ORDER, self.inputs(batch)))
        clean = dict(zip(DATA_ORDER, self.clean_inputs(batch)))
        if self.bert is not None:
            text = self.encode_text(batch)
            clean["L"] = text
            inputs["L"] = text * present[:, 2].view(-1, 1, 1).to(text.dtype)
        feats = {m: self.project(inputs[m], m) for m in DATA_ORDER}
        # The recovery branch sees the projections detached (conditions and targets); see the class notes.
        detached = {m: f.detach() for m, f in feats.items()}
        score_terms, rec_terms, recovery = [], [], {}
        for j, m in enumerate(DATA_ORDER):
            if bool(present[:, j].all()):
                continue
            rows, cond = self._condition(detached, present, m)
            if clean[m] is inputs[m]:
                target = detached[m][rows]
            else:
                with torch.no_grad():
                    target = self.proj[m](clean[m][rows].transpose(1, 2))
            if losses:
                score_terms.append(dsm_loss(self.score[m], target, cond, self.sigma, generator=generator,
                                            condition_noise=self.condition_noise) * (rows.numel() / b))
            raw = self._sample(m, cond, generator) if fill is None else fill(m, cond)
            rec = self.refine[m](raw) if refine else raw
            if losses:
                rec_terms.append((rec - target).pow(2).flatten(1).mean(1).sum() / b)
            recovery[m] = (rec, target)
            feats[m] = feats[m].index_copy(0, rows, rec.to(feats[m].dtype))
        out = self.fusion(*(feats[m] for m in DATA_ORDER))
        res = {"pred": out.squeeze(-1) if self.num_classes == 1 else out, "recovery": recovery}
        if losses:
            zero = out.new_zeros(())
            res["score"] = torch.stack(score_terms).sum() if score_terms else zero
            res["rec"] = torch.stack(rec_terms).sum() if rec_terms else zero
        return res

    # ------------------------------------------------------------------ interface
    def forward(self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """Prediction ``[B]`` (regression) or logits ``[B, C]``; missing modalities are recovered first."""
        return self._run(batch, losses=False, generator=generator)["pred"]

    def predict(self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """The regression output ``[B]`` (class indices when ``num_classes > 1``)."""
        pred = self(batch, generator=generator)
        return pred if self.num_classes == 1 else pred.argmax(dim=-1)

    @torch.no_grad()
    def predict_with_recovery(
        self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None, *,
        fill: Callable[[str, Tensor], Tensor] | None = None, refine: bool = True,
    ) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
        """``(predict(batch), recover(batch))`` from one pass (one sampler run per missing modality), without
        gradient.

        ``fill(m, cond) -> [n, d, L]`` replaces the sampler (a baseline recovery: zeros, the mean, a regressor from
        the same condition ``cond`` ``[n, d, L]``); ``refine=False`` passes the raw sample (or fill) to the fusion
        without the refiner."""
        res = self._run(batch, losses=False, generator=generator, fill=fill, refine=refine)
        pred = res["pred"] if self.num_classes == 1 else res["pred"].argmax(dim=-1)
        return pred, res["recovery"]

    @torch.no_grad()
    def recover(
        self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """``{m: (recovered [n_m, d, T'], target [n_m, d, T'])}`` for each modality missing in ``n_m > 0`` rows
        (rows in ascending batch order); the target is the projection of the true features: ``batch["<m>_clean"]``
        when the batch has it, else ``batch[m]`` (which must then hold the true features, not zeros)."""
        return self.predict_with_recovery(batch, generator=generator)[1]

    def training_loss(
        self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, {"l1" | "ce", "score", "rec"})`` with ``loss = task + score_weight * (score + rec)``; the
        parts are the unweighted terms, detached. With ``objective="score"`` it is
        :meth:`score_pretraining_loss` instead."""
        if self.objective == "score":
            return self.score_pretraining_loss(batch, generator=generator)
        res = self._run(batch, losses=True, generator=generator)
        label = batch["label"].to(res["pred"].device)
        if self.num_classes == 1:
            name, task = "l1", F.l1_loss(res["pred"], label.to(res["pred"].dtype))
        else:
            name, task = "ce", F.cross_entropy(res["pred"], label.long())
        loss = task + self.score_weight * (res["score"] + res["rec"])
        return loss, {name: task.detach(), "score": res["score"].detach(), "rec": res["rec"].detach()}
