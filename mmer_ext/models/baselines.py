"""Full-modality baseline ``UttFusion`` (= MMIN's stage-1 teacher ``utt_fusion``; MMIN, Zhao et al., ACL 2021; github.com/AIM3-RUC/MMIN)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from mmer_ext.models.base import MERModel
from mmer_ext.models.encoders import FcClassifier, ModalityEncoders, fuse, kaiming_init_

__all__ = ["UttFusion"]


class UttFusion(MERModel):
    """Late-fusion classifier: A/V LSTM and L TextCNN encoders, ``[a, l, v]`` (384) -> FcClassifier(384 -> 128 ->
    128 -> C, ReLU, dropout 0.3), cross-entropy, gradient clip 0.5.

    Trained on full data it is the "full-modality baseline" and MMIN's teacher; trained on missing-augmented data
    (recipe "augmented") it is the augmented baseline — :meth:`training_loss` simply uses the batch input as given.

    Parameters
    ----------
    dims : ModalityDims or (A, V, L)
        Input feature sizes.
    num_classes : int
        C.
    teacher : None
        Accepted for the common constructor signature; unused.
    hidden : int
        Per-modality embedding (128).
    cls_layers : sequence of int
        Classifier hidden sizes (128, 128).
    dropout : float
        Classifier dropout (0.3).
    text_dropout : float
        TextCNN dropout (0.5).
    embd_method_a, embd_method_v : str
        LSTM pooling ("maxpool").
    use_lengths : bool
        Pool over valid frames only (True; see :class:`~mmer_ext.models.encoders.LSTMEncoder`). False reproduces the
        authors' pooling over the padding.
    """

    clip_grad_norm = 0.5

    def __init__(
        self,
        dims,
        num_classes: int,
        *,
        teacher=None,
        hidden: int = 128,
        cls_layers: Sequence[int] = (128, 128),
        dropout: float = 0.3,
        text_dropout: float = 0.5,
        embd_method_a: str = "maxpool",
        embd_method_v: str = "maxpool",
        use_lengths: bool = True,
    ) -> None:
        super().__init__()
        del teacher
        self.num_classes = int(num_classes)
        self.encoders = ModalityEncoders(
            dims,
            hidden,
            embd_method_a=embd_method_a,
            embd_method_v=embd_method_v,
            text_dropout=text_dropout,
            use_lengths=use_lengths,
        )
        self.classifier = FcClassifier(self.encoders.fused_dim, cls_layers, self.num_classes, dropout=dropout)
        kaiming_init_(self)

    def features(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-modality embeddings ``{"A", "V", "L": [B, hidden]}`` of the input as given."""
        return self.encoders(*self.inputs(batch), self.lengths(batch))

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        return self.classifier(fuse(self.features(batch)))

    def training_loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        ce = F.cross_entropy(self(batch), batch["label"])
        return ce, {"ce": ce.detach()}

    @torch.no_grad()
    def fused(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The 384-d fusion vector ``[a, l, v]`` (no grad)."""
        return fuse(self.features(batch))
