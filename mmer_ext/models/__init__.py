"""Models of the MMIN family (MMIN, IF-MMIN, NMER) and their baselines, the dialogue-graph model MMGCN and the
score-based recovery model IMDer (with its MulT backbone and score network).

Every model follows one interface: ``Model(dims, num_classes, *, teacher=None, **hparams)``, ``forward(batch) ->
logits``, ``training_loss(batch) -> (loss, parts)``, ``trainable_parameters()``, ``clip_grad_norm``; the
imagination models also have ``embeddings(batch)``. :data:`RECIPES` holds the training stages of each system.
"""

from mmer_ext.models.base import MERModel, freeze_, trainable_copy
from mmer_ext.models.baselines import UttFusion
from mmer_ext.models.encoders import (
    FUSION_ORDER,
    FcClassifier,
    LSTMEncoder,
    ModalityEncoders,
    ResidualAE,
    ResidualXE,
    SharedEncoder,
    TextCNN,
    fuse,
    kaiming_init_,
)
from mmer_ext.models.ifmmin import IFMMIN, UttShared
from mmer_ext.models.imder import IMDer
from mmer_ext.models.mmgcn import MMGCN, GCNIILayer, gcnii_theta, mmgcn_focal_loss
from mmer_ext.models.mmin import MMIN
from mmer_ext.models.mult import MulT
from mmer_ext.models.nmer import NMER, NMERTeacher
from mmer_ext.models.recipes import RECIPES, Stage, get_recipe
from mmer_ext.models.score_net import ScoreNet, dsm_loss

__all__ = [
    "FUSION_ORDER",
    "IFMMIN",
    "IMDer",
    "MMGCN",
    "MMIN",
    "MulT",
    "NMER",
    "NMERTeacher",
    "RECIPES",
    "FcClassifier",
    "GCNIILayer",
    "LSTMEncoder",
    "MERModel",
    "ModalityEncoders",
    "ResidualAE",
    "ResidualXE",
    "ScoreNet",
    "SharedEncoder",
    "Stage",
    "TextCNN",
    "UttFusion",
    "UttShared",
    "freeze_",
    "fuse",
    "gcnii_theta",
    "get_recipe",
    "kaiming_init_",
    "dsm_loss",
    "mmgcn_focal_loss",
    "trainable_copy",
]
