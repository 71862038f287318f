"""MMIN (Zhao et al., ACL 2021): missing modality imagination with a cascade residual autoencoder; github.com/AIM3-RUC/MMIN."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from mmer_ext.models.base import MERModel, trainable_copy
from mmer_ext.models.baselines import UttFusion
from mmer_ext.models.encoders import FcClassifier, ResidualAE, fuse, kaiming_init_

__all__ = ["MMIN"]


class MMIN(MERModel):
    """Missing Modality Imagination Network.

    The student encodes the (missing-masked) input with A/V/L encoders initialised from the teacher ``utt_fusion``
    (deep copies, trained further), fuses ``f_miss = [a, l, v]`` (384), and a cascade residual autoencoder
    (:class:`~mmer_ext.models.encoders.ResidualAE`) "imagines" the features of the missing modalities::

        recon, latent = AE(f_miss)              # [B, 384], [B, 5 x 64 = 320]
        logits        = classifier(latent)      # FcClassifier(320 -> 128 -> 128 -> C, dropout 0.5)
        cycle, _      = AE_cycle(recon)         # backward imagination, separate weights unless share_weight

    Loss (weights configurable)::

        ce_weight * CE(logits, y) + mse_weight * MSE(T, recon) + cycle_weight * MSE(f_miss.detach(), cycle)

    with ``T = fuse(teacher.encoders(x_clean * (1 - missing_index)))``: the frozen teacher's ``[a, l, v]`` of the
    *reversed* input, in which only the missing modalities are present (the available ones zeroed). ``T`` is
    computed without gradient and with the teacher in eval mode (TextCNN dropout off).

    Parameters
    ----------
    dims : ModalityDims or (A, V, L)
        Input feature sizes.
    num_classes : int
        C.
    teacher : UttFusion, optional
        The trained stage-1 model. Registered (frozen, eval) as ``self.teacher`` so a checkpoint holds the whole
        student; excluded from :meth:`trainable_parameters`. With None a fresh ``UttFusion(dims, C,
        **teacher_hparams)`` is built — only useful to load a saved MMIN state dict into.
    teacher_hparams : dict, optional
        Constructor arguments of that fresh teacher.
    ae_layers, n_blocks : sequence of int, int
        (256, 128, 64) and 5 -> latent 320.
    share_weight : bool
        Use the forward AE as the backward one too (the authors' ``--share_weight``; the MSP-IMPROV recipe).
    cls_layers, dropout : sequence of int, float
        Classifier (128, 128), dropout 0.5.
    ce_weight, mse_weight, cycle_weight : float
        1.0, 4.0, 2.0 (IEMOCAP scripts; MSP-IMPROV uses mse 2.0, cycle 0.5).

    Notes
    -----
    * Missing-condition bookkeeping (MMIN issue #9): the authors' dataset draws the per-sample ``missing_index``
      and a ``miss_type`` string independently, so the string does not always name the condition of the mask. The
      string only labels evaluation slices, though: the model's ``set_input`` builds both the masked input and the
      reversed teacher input from ``missing_index`` (``x * (1 - missing_index)``), so the target always matches the
      masked input in their code as in ours, where the batch's single ``missing_index`` drives both.
    * The reversed input is built from the *clean* features (``"*_clean"``), so the target is the same for the
      ``"zero"`` and noisy corruptions.
    * Gradient clipping 1.0; :meth:`clip_gradients_` clips per network like the authors.
    """

    clip_grad_norm = 1.0

    def __init__(
        self,
        dims,
        num_classes: int,
        *,
        teacher: UttFusion | None = None,
        teacher_hparams: Mapping | None = None,
        ae_layers: Sequence[int] = (256, 128, 64),
        n_blocks: int = 5,
        share_weight: bool = False,
        cls_layers: Sequence[int] = (128, 128),
        dropout: float = 0.5,
        ce_weight: float = 1.0,
        mse_weight: float = 4.0,
        cycle_weight: float = 2.0,
    ) -> None:
        super().__init__()
        if teacher is None:
            teacher = UttFusion(dims, num_classes, **dict(teacher_hparams or {}))
        self.num_classes = int(num_classes)
        self.ce_weight, self.mse_weight, self.cycle_weight = float(ce_weight), float(mse_weight), float(cycle_weight)
        self.share_weight = bool(share_weight)
        # Copy before freezing the teacher, so the student's encoders are independent, trainable modules.
        self.encoders = trainable_copy(teacher.encoders)
        fused_dim = self.encoders.fused_dim
        self.ae = ResidualAE(ae_layers, n_blocks, fused_dim)
        self.ae_cycle = self.ae if self.share_weight else ResidualAE(ae_layers, n_blocks, fused_dim)
        self.classifier = FcClassifier(self.ae.latent_dim, cls_layers, self.num_classes, dropout=dropout)
        for module in (self.ae, self.ae_cycle, self.classifier):
            kaiming_init_(module)
        self.register_frozen("teacher", teacher)

    # ------------------------------------------------------------------ pieces
    def student_fusion(self, batch: Mapping[str, Tensor]) -> Tensor:
        """``f_miss = [a, l, v]`` of the input as given (masked / corrupted), ``[B, 384]``."""
        return fuse(self.encoders(*self.inputs(batch), self.lengths(batch)))

    @torch.no_grad()
    def target(self, batch: Mapping[str, Tensor]) -> Tensor:
        """``T``: the frozen teacher encoders' ``[a, l, v]`` of the reversed clean input, ``[B, 384]``."""
        self.teacher.eval()
        rev = self.masked_clean_inputs(batch, keep="missing")
        return fuse(self.teacher.encoders(*rev, self.lengths(batch)))

    def _run(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        f_miss = self.student_fusion(batch)
        recon, latent = self.ae(f_miss)
        return {"f_miss": f_miss, "recon": recon, "latent": latent, "logits": self.classifier(latent)}

    # ------------------------------------------------------------------ interface
    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        return self._run(batch)["logits"]

    def training_loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, {"ce", "mse", "cycle"})``; the parts are the unweighted terms."""
        out = self._run(batch)
        ce = F.cross_entropy(out["logits"], batch["label"])
        mse = F.mse_loss(out["recon"], self.target(batch))
        cycle_recon, _ = self.ae_cycle(out["recon"])
        cycle = F.mse_loss(cycle_recon, out["f_miss"].detach())
        loss = self.ce_weight * ce + self.mse_weight * mse + self.cycle_weight * cycle
        return loss, {"ce": ce.detach(), "mse": mse.detach(), "cycle": cycle.detach()}

    @torch.no_grad()
    def embeddings(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{"imagined": recon [B, 384], "target": T [B, 384]}`` for the t-SNE figure (no grad)."""
        return {"imagined": self._run(batch)["recon"], "target": self.target(batch)}
