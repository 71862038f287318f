"""Training recipes: the paper / official-script hyper-parameters of every system, one :class:`Stage` per training
stage (teacher then student for the two-stage systems).

Values (from the authors' code and scripts of MMIN, IF-MMIN and NMER; Adam, ``weight_decay`` 0 because the authors pass the flag to an optimizer call that ignores
it, linear LR decay to 0 over ``epochs_decay`` extra epochs, model selected by validation UA):

==========  =======  ============  ==============  ==========  ==========  =====  ====  ======  ===========
recipe      stage    model         data            corruption  epochs      batch  lr    beta1   grad clip
==========  =======  ============  ==============  ==========  ==========  =====  ====  ======  ===========
baseline    main     UttFusion     full            zero        10 + 10     128    2e-4  0.9     0.5
augmented   main     UttFusion     missing+full    zero        10 + 10     128    2e-4  0.9     0.5
mmin        teacher  UttFusion     full            zero        10 + 10     128    2e-4  0.9     0.5
mmin        student  MMIN          missing         zero        30 + 30     128    2e-4  0.5     1.0
ifmmin      teacher  UttShared     full            zero        10 + 10     64     2e-4  0.9     0.5
ifmmin      student  IFMMIN        missing         zero        20 + 20     128    2e-4  0.5     1.0
nmer        teacher  NMERTeacher   full            gaussian    10 + 10     64     2e-4  0.9     (model)
nmer        student  NMER          missing         gaussian    40 + 40     128    2e-4  0.5     (model)
==========  =======  ============  ==============  ==========  ==========  =====  ====  ======  ===========

Sources and assumptions: ``utt_fusion`` (10+10, batch 128, beta1 0.9 from its script) and ``mmin`` (30+30, beta1
0.5 = the option default, which the official scripts do not override) are MMIN, Zhao et al., ACL 2021; github.com/AIM3-RUC/MMIN. IF-MMIN's ``utt_shared`` uses
batch 64, 10+10 (IF-MMIN, Zuo et al., ICASSP 2023; github.com/ZhuoYulang/IF-MMIN); its beta1 is not given and we take ``utt_fusion``'s script value 0.9. The IF-MMIN
student is 20+20, batch 128, beta1 0.5 (the default) with ``invariant_weight`` 100, an inference from the NMER
repository's fixed script ``scripts/fix/CAP_IFMMIN_001.sh`` (the IF-MMIN authors' own script passes an undefined flag;
see :class:`~mmer_ext.models.ifmmin.IFMMIN`). NMER's teacher script ``fix/CAP_utt_shared_002.sh``: batch 64, beta1 0.9,
10+10, dropout 0.2; student 40+40, batch 128 (NMER, arXiv 2311.16114; github.com/WooyoohL/Noise-robust_MER). The "augmented" baseline is not a system of the papers but
the usual missing-augmented reference (UttFusion trained on the six missing conditions plus full input, one drawn per
sample and epoch); it reuses the baseline's schedule. The NMER teacher trains on full data, so its corruption is
moot; it is "gaussian" so that the whole NMER pipeline evaluates under the same noise.

MMGCN (Hu et al., ACL 2021; the authors' ``run.sh`` in github.com/hujingwen6666/MMGCN) trains on dialogues (``data="dialogue"``: batches of whole dialogues from
:func:`~mmer_ext.data.collate_dialogues`, full modalities), Adam with default betas and L2 ``weight_decay``, constant
LR, batch 16 dialogues, selection on weighted F1:

===========  =====  ====  ======  =====  =====  ===================================================
recipe       model  lr    l2      batch  epoch  loss
===========  =====  ====  ======  =====  =====  ===================================================
mmgcn        MMGCN  3e-4  3e-5    16     20     NLL with IEMOCAP-ERC class weights, dropout 0.4
mmgcn-meld   MMGCN  1e-3  0       16     60     the authors' focal loss (gamma 2.5, alpha 1)
===========  =====  ====  ======  =====  =====  ===================================================

IMDer (Wang et al., NeurIPS 2023; the authors' ``config/config.json`` in github.com/mdswyz/IMDer) trains on fixed-length sequences in two stages with the same
model class: ``pretrain`` on complete data (their MR = 0.0 checkpoint), then ``main`` at the configured missing rate
(``TrainConfig.missing_rate``, 0.1 by default as their ``train.py``) with the projections frozen. Adam without weight
decay (the configured 0.005 is never passed), ReduceLROnPlateau (x0.5) and early stopping after 20 epochs on the
validation L1 (= MAE, lower is better), gradient clipping by value. Between the two, ``imder`` and
``imder-mosei`` (not ``imder-authors``) run a ``score`` stage that is not the authors': the score networks (and pair
fusions) alone learn from every complete training sample (``IMDer(objective="score")``), ``SCORE_STAGE`` epochs of
``repeats`` passes, constant LR, the last epoch kept; it inherits the pretraining stage's architecture. The authors'
score nets learn only inside the missing-data stage, on the rows that happen to be missing: a few dozen steps on
small data, far from what recovery needs (``benchmarks/results/imder_recovery-*.md``).

=============  =====  ====  ========  ========  ============  ==============================================
recipe         batch  lr    patience  clip      MulT levels   dropouts (attn audio / embed)
=============  =====  ====  ========  ========  ============  ==============================================
imder          32     2e-3  24        1.0       4             0.2 / 0.2 (MOSI)
imder-mosei    128    2e-3  5         0.6       6             0 / 0 (MOSEI)
=============  =====  ====  ========  ========  ============  ==============================================

``imder-authors`` is ``imder`` with the authors' condition mode (``condition_noise="shared"``: the condition is
perturbed with the target's noise in training and re-noised in sampling), score network (``"unet"``, no EMA) and
plain refiners (``refine_residual=False``); ``imder`` and ``imder-mosei`` keep the condition clean and start their
refiners as the identity (see :class:`~mmer_ext.models.imder.IMDer`). The authors train until early stopping; the recipes cap
each stage at 100 epochs. The recovery sampler is the
authors' 100-step Euler-Maruyama unless ``TrainConfig.sampler`` / ``sampler_steps`` (``--sampler``, ``--steps``) say
otherwise.

MSP-IMPROV (MMIN's ``scripts/MSP_utt_fusion.sh`` and ``scripts/MSP_mmin.sh``; 12 folds, ``--fold 1-12``; both
stages select on validation macro-F1 as the authors' ``--corpus_name=MSP`` branch does):

=============  =======  ==========  =====  ====  =====  =========  =====================================
recipe         stage    model       batch  lr    beta1  epochs     hparams
=============  =======  ==========  =====  ====  =====  =========  =====================================
baseline-msp   main     UttFusion   64     5e-4  0.9    10 + 10    dropout 0.3
mmin-msp       teacher  UttFusion   64     5e-4  0.9    10 + 10    dropout 0.3
mmin-msp       student  MMIN        128    5e-4  0.5    30 + 30    mse 2.0, cycle 0.5, shared autoencoder
=============  =======  ==========  =====  ====  =====  =========  =====================================

The authors' variants, where the package's default is a fix (each model's notes say why): ``nmer-authors`` (CVAE
attention across the batch, ``z`` sampled at evaluation, KL summed over the batch, the CVAE kaiming-initialised by
``init_net``, padding frames noised; the teacher's UNet term is not reproduced, see
:class:`~mmer_ext.models.nmer.NMERTeacher`), ``mmgcn-authors`` / ``mmgcn-meld-authors`` (text BiLSTM over the
zero-padded batch, dropout masks drawn as their ``nn.Dropout``, RNG re-seeded with 27350 before every pass; add
``--select-on-test`` for their selection on the test set) and ``imder-authors``. MMIN and IF-MMIN have none:
their defaults are the authors' code. IF-MMIN's and NMER's MSP-IMPROV settings are not in their repositories'
scripts, so there is no ``ifmmin-msp`` / ``nmer-msp``.

MMGCN's ``run.sh`` gives no MELD dropout; 0.4 is kept. MMGCN's constructor also needs ``num_speakers`` (from the data:
``DialogueDataset.num_speakers``), which a recipe cannot know; the trainer passes it. The authors select on the test
set (no validation split); here the recipes select on the validation split like every other system (the data
layer's ``val_from="test"`` reproduces theirs).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from mmer_ext.models.baselines import UttFusion
from mmer_ext.models.ifmmin import IFMMIN, UttShared
from mmer_ext.models.imder import IMDer
from mmer_ext.models.mmgcn import MMGCN
from mmer_ext.models.mmin import MMIN
from mmer_ext.models.nmer import NMER, NMERTeacher

__all__ = ["RECIPES", "Stage", "get_recipe"]


@dataclass(frozen=True)
class Stage:
    """One training stage.

    Attributes
    ----------
    name : {"teacher", "student", "main"}
    model : type
        Model class, built as ``model(dims, num_classes, teacher=previous_stage_model, **hparams)``.
    data : {"full", "missing", "missing+full", "dialogue"}
        Training view: all modalities; one of the six missing conditions per sample (MMIN protocol); one of the
        seven (six + full); whole dialogues with all modalities (dialogue-graph models: a
        :class:`~mmer_ext.data.DialogueDataset`, :func:`~mmer_ext.data.collate_dialogues`).
    corruption : {"zero", "gaussian", "impulse"}
        How the missing modalities are corrupted (``mmer_ext.data.corrupt_batch``).
    epochs, epochs_decay : int
        Constant-LR epochs, then linear decay to 0 over ``epochs_decay`` more.
    batch_size : int
    lr : float
    betas : tuple of float
        Adam betas.
    weight_decay : float
    select_metric : str
        Validation metric that picks the best epoch ("UA"; "WF1" for MMGCN; "MAE" for IMDer).
    hparams : dict
        Constructor keyword arguments.
    select_mode : {"max", "min", "last"}
        Whether a larger or a smaller ``select_metric`` is better; ``"last"`` keeps the last epoch (a stage its
        validation metric cannot judge).
    lr_policy : {"linear", "plateau"}
        ``linear``: constant for ``epochs`` then linear decay to 0 over ``epochs_decay`` (MMIN family);
        ``plateau``: ``ReduceLROnPlateau`` on the validation metric, factor 0.5, ``plateau_patience`` (IMDer).
    early_stop : int or None
        Stop a stage after this many epochs without a better validation metric (IMDer: 20).
    noise_padding : bool
        Noise modes: also noise the padding frames of a noised modality (the authors' NMER), in training and
        evaluation; False keeps them zero.
    reseed_each_pass : int or None
        Re-seed torch's RNG with this value at the start of every training and evaluation pass, and repeat epoch
        0's data order every epoch (MMGCN's authors: 27350); None draws a new stream per ``(seed, epoch)``.
    repeats : int
        Passes over the training data per epoch (validation and checkpoints once per epoch). An epoch count given
        in the config (``epochs``, ``stage_epochs``) counts passes: the stage then runs that many, one per epoch.
    inherit_hparams : bool
        Start from the previous stage's resolved hparams (its architecture), then apply this stage's own.
    """

    name: str
    model: type
    data: str
    corruption: str
    epochs: int
    epochs_decay: int
    batch_size: int
    lr: float
    betas: tuple[float, float]
    weight_decay: float = 0.0
    select_metric: str = "UA"
    hparams: dict[str, Any] = field(default_factory=dict)
    select_mode: str = "max"
    lr_policy: str = "linear"
    plateau_patience: int = 10
    early_stop: int | None = None
    noise_padding: bool = False
    reseed_each_pass: int | None = None
    repeats: int = 1
    inherit_hparams: bool = False

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.epochs_decay


_TEACHER_BETAS = (0.9, 0.999)
_STUDENT_BETAS = (0.5, 0.999)

_UTT_FUSION = dict(data="full", corruption="zero", epochs=10, epochs_decay=10, batch_size=128, lr=2e-4,
                   betas=_TEACHER_BETAS)

RECIPES: dict[str, tuple[Stage, ...]] = {
    "baseline": (Stage("main", UttFusion, **_UTT_FUSION),),
    "augmented": (Stage("main", UttFusion, **{**_UTT_FUSION, "data": "missing+full"}),),
    "mmin": (
        Stage("teacher", UttFusion, **_UTT_FUSION),
        Stage("student", MMIN, data="missing", corruption="zero", epochs=30, epochs_decay=30, batch_size=128,
              lr=2e-4, betas=_STUDENT_BETAS, hparams={"mse_weight": 4.0, "cycle_weight": 2.0}),
    ),
    "ifmmin": (
        Stage("teacher", UttShared, data="full", corruption="zero", epochs=10, epochs_decay=10, batch_size=64,
              lr=2e-4, betas=_TEACHER_BETAS),
        # invariant_weight 100: from the NMER repository's scripts/fix/CAP_IFMMIN_001.sh, not IF-MMIN's own script
        # (which passes the undefined --consistent_weight=100); an inference, see IFMMIN's notes.
        Stage("student", IFMMIN, data="missing", corruption="zero", epochs=20, epochs_decay=20, batch_size=128,
              lr=2e-4, betas=_STUDENT_BETAS, hparams={"mse_weight": 1.0, "invariant_weight": 100.0}),
    ),
    "nmer": (
        Stage("teacher", NMERTeacher, data="full", corruption="gaussian", epochs=10, epochs_decay=10, batch_size=64,
              lr=2e-4, betas=_TEACHER_BETAS),
        Stage("student", NMER, data="missing", corruption="gaussian", epochs=40, epochs_decay=40, batch_size=128,
              lr=2e-4, betas=_STUDENT_BETAS),
    ),
    "mmgcn": (
        Stage("main", MMGCN, data="dialogue", corruption="zero", epochs=20, epochs_decay=0, batch_size=16, lr=3e-4,
              betas=_TEACHER_BETAS, weight_decay=3e-5, select_metric="WF1",
              hparams={"dropout": 0.4, "class_weights": "iemocap", "loss": "nll"}),
    ),
    "mmgcn-meld": (
        Stage("main", MMGCN, data="dialogue", corruption="zero", epochs=60, epochs_decay=0, batch_size=16, lr=1e-3,
              betas=_TEACHER_BETAS, weight_decay=0.0, select_metric="WF1",
              hparams={"dropout": 0.4, "loss": "focal", "focal_gamma": 2.5}),
    ),
}


def _imder_stages(batch_size: int, patience: int, hparams: dict[str, Any]) -> tuple[Stage, ...]:
    common = dict(model=IMDer, corruption="zero", epochs=100, epochs_decay=0, batch_size=batch_size, lr=2e-3,
                  betas=_TEACHER_BETAS, select_metric="MAE", select_mode="min", lr_policy="plateau",
                  plateau_patience=patience, early_stop=20, hparams=hparams)
    return (Stage("pretrain", data="complete", **common), Stage("main", data="missing-rate", **common))


def _imder_with_score_stage(stages: tuple[Stage, ...]) -> tuple[Stage, ...]:
    # Score pretraining between the two: the projections are frozen (the stage is a student of the pretrained
    # model), every complete sample trains the score nets of all three modalities, constant LR, the last epoch kept.
    score = Stage("score", IMDer, data="complete", corruption="zero", epochs=SCORE_STAGE["epochs"], epochs_decay=0,
                  batch_size=SCORE_STAGE["batch_size"], lr=SCORE_STAGE["lr"], betas=_TEACHER_BETAS,
                  select_metric="MAE", select_mode="last", lr_policy="linear", repeats=SCORE_STAGE["repeats"],
                  inherit_hparams=True, hparams={"objective": "score",
                                                 "condition_noise": stages[0].hparams["condition_noise"]})
    return (stages[0], score, stages[1])


#: The score-pretraining stage of the ``imder`` recipes: epochs x repeats passes at this batch size
#: (on the embedded 400-sequence training split: 7 batches a pass).
SCORE_STAGE = {"epochs": 10, "repeats": 40, "batch_size": 64, "lr": 1e-3}


# The condition mode is stated in every IMDer recipe (and so in every checkpoint's metadata); "clean" is ours,
# "shared" the authors' (see IMDer's notes: their mode reads the condition with the wrong sign).
RECIPES["imder"] = _imder_with_score_stage(_imder_stages(32, 24, {"condition_noise": "clean"}))
RECIPES["imder-mosei"] = _imder_with_score_stage(_imder_stages(
    128, 5, {"nlevels": 6, "attn_dropout_a": 0.0, "embed_dropout": 0.0, "clip_grad_value": 0.6,
             "condition_noise": "clean"}))
# The authors keep no EMA of the score weights (their samplers read the live networks), score with a sequence
# U-Net (the package's default is the per-frame score net, see IMDer's notes) and refine with a plain
# (non-residual) stack.
RECIPES["imder-authors"] = _imder_stages(32, 24, {"condition_noise": "shared", "score_ema": None,
                                                  "score_net": "unet", "refine_residual": False})


# ---------------------------------------------------------------------------------------------- MSP-IMPROV (MMIN)
# MMIN's scripts/MSP_utt_fusion.sh (teacher: batch 64, lr 5e-4, beta1 0.9, 10 + 10, dropout 0.3) and
# scripts/MSP_mmin.sh (student: mse 2.0, cycle 0.5, --share_weight, batch 128, lr 5e-4, 30 + 30, beta1 left at the
# option default 0.5; its --weight_decay=1e-5 reaches an optimizer call that does not pass it); both loop over 12
# folds and pass --corpus_name=MSP, for which train_baseline.py / train_miss.py select the epoch on validation
# macro-F1 (IEMOCAP: UA).
_MSP_TEACHER = Stage("teacher", UttFusion, data="full", corruption="zero", epochs=10, epochs_decay=10, batch_size=64,
                     lr=5e-4, betas=_TEACHER_BETAS, select_metric="F1")
RECIPES["baseline-msp"] = (replace(_MSP_TEACHER, name="main"),)
RECIPES["mmin-msp"] = (
    _MSP_TEACHER,
    Stage("student", MMIN, data="missing", corruption="zero", epochs=30, epochs_decay=30, batch_size=128, lr=5e-4,
          betas=_STUDENT_BETAS, select_metric="F1",
          hparams={"mse_weight": 2.0, "cycle_weight": 0.5, "share_weight": True}),
)

# ---------------------------------------------------------------------------------------------- authors' variants
# The published code's behaviour where the package's default is a fix (see each model's notes); MMIN and IF-MMIN
# have no such switch because their defaults are the authors' (imder-authors is above).
RECIPES["nmer-authors"] = (
    replace(RECIPES["nmer"][0], noise_padding=True),
    replace(RECIPES["nmer"][1], noise_padding=True,
            hparams={"attend_across_batch": True, "sample_at_eval": True, "kl_reduction": "sum",
                     "cvae_init": "kaiming"}),
)
RECIPES["mmgcn-authors"] = (
    replace(RECIPES["mmgcn"][0], reseed_each_pass=27350,
            hparams={**RECIPES["mmgcn"][0].hparams, "text_lstm_input": "padded", "dropout_rng": "bernoulli"}),
)
RECIPES["mmgcn-meld-authors"] = (
    replace(RECIPES["mmgcn-meld"][0], reseed_each_pass=27350,
            hparams={**RECIPES["mmgcn-meld"][0].hparams, "text_lstm_input": "padded", "dropout_rng": "bernoulli"}),
)


def get_recipe(name: str) -> tuple[Stage, ...]:
    """``RECIPES[name]`` with a readable error."""
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}") from None
