"""Common base of the emotion-recognition models: trainable-parameter bookkeeping, frozen teachers, gradient
clipping and reading the (masked) inputs out of a collated batch.

A batch is the dict of :func:`mmer_ext.data.collate_utterances`, optionally passed through
:func:`mmer_ext.data.corrupt_batch`: ``"A"``, ``"V"``, ``"L"`` ``[B, T_m, D_m]`` are the model input as given (missing
modalities already zeroed or noised), ``"A_clean"`` ... the clean features, ``"lengths"`` ``[B, 3]`` and
``"missing_index"`` ``[B, 3]`` in A, V, L order (1 = present), ``"label"`` ``[B]``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from mmer_ext.models.encoders import ModalityEncoders

__all__ = ["DATA_ORDER", "MERModel", "freeze_", "trainable_copy"]

#: Column order of ``missing_index`` and ``lengths`` (``mmer_ext.data.MODALITIES``).
DATA_ORDER: tuple[str, str, str] = ("A", "V", "L")


def freeze_(module: nn.Module) -> nn.Module:
    """Stop gradients to every parameter of ``module`` and put it in eval mode (dropout off, BN running stats).

    A :class:`MERModel` keeps a frozen submodule in eval mode even when ``model.train()`` is called, once it is
    registered with :meth:`MERModel.register_frozen`.
    """
    module.requires_grad_(False)
    module.eval()
    return module


def trainable_copy(module: nn.Module) -> nn.Module:
    """Deep copy of ``module`` with gradients on and in train mode: how a student takes its initial encoders from
    a (frozen) teacher without sharing weights with it."""
    clone = copy.deepcopy(module)
    clone.requires_grad_(True)
    clone.train()
    return clone


class MERModel(nn.Module):
    """Base class of every model of :mod:`mmer_ext.models`.

    Subclasses set the class attribute :attr:`clip_grad_norm` (the max gradient norm of the authors' recipe, ``None`` = no
    clipping) and implement ``forward(batch) -> logits`` and ``training_loss(batch) -> (loss, parts)``.

    Frozen submodules (a student's teacher) are registered with :meth:`register_frozen`: they stay in the
    ``state_dict`` (a checkpoint restores the whole student), get no gradients, are left out of
    :meth:`trainable_parameters` and stay in eval mode through ``train()``.
    """

    #: Max global gradient norm per the authors' recipe (None = no clipping).
    clip_grad_norm: float | None = None

    def __init__(self) -> None:
        super().__init__()
        self._frozen_names: list[str] = []

    # ------------------------------------------------------------------ parameters / modes
    def register_frozen(self, name: str, module: nn.Module) -> nn.Module:
        """Attach ``module`` as submodule ``name``, frozen (see :func:`freeze_`)."""
        setattr(self, name, freeze_(module))
        if name not in self._frozen_names:
            self._frozen_names.append(name)
        return module

    def frozen_modules(self) -> Iterator[nn.Module]:
        for name in self._frozen_names:
            yield getattr(self, name)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser must see: every parameter outside the frozen submodules (deduplicated, so a
        module registered twice, e.g. MMIN's shared AE, counts once)."""
        frozen = {id(p) for m in self.frozen_modules() for p in m.parameters()}
        return [p for p in self.parameters() if id(p) not in frozen and p.requires_grad]

    def train(self, mode: bool = True) -> MERModel:
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def clip_nets(self) -> list[nn.Module]:
        """The "networks" whose gradients the authors clip one by one (``netA``, ``netV``, ``netL``, ``netC``,
        ``netAE``, ...): the trainable top-level children, with :class:`ModalityEncoders` split into A, V, L."""
        frozen = set(self._frozen_names)
        nets: list[nn.Module] = []
        for name, child in self.named_children():
            if name in frozen:
                continue
            if isinstance(child, ModalityEncoders):
                nets.extend([child.A, child.V, child.L])
            elif any(p.requires_grad for p in child.parameters()):
                nets.append(child)
        return nets

    def clip_gradients_(self, per_net: bool = True) -> Tensor | None:
        """Clip gradients to :attr:`clip_grad_norm`; returns the (largest) pre-clip norm, or None when not clipping.

        ``per_net=True`` clips each of :meth:`clip_nets` separately, as the authors' ``optimize_parameters`` does
        (one ``clip_grad_norm_`` call per network); ``per_net=False`` clips the global norm of
        :meth:`trainable_parameters`. A module shared by two nets (MMIN's ``share_weight``) is clipped once.
        """
        if self.clip_grad_norm is None:
            return None
        if not per_net:
            return torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.clip_grad_norm)
        norms, seen = [], set()
        for net in self.clip_nets():
            params = [p for p in net.parameters() if p.grad is not None and id(p) not in seen]
            seen.update(id(p) for p in params)
            if params:
                norms.append(torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm))
        return torch.stack(norms).max() if norms else None

    # ------------------------------------------------------------------ batch helpers
    @staticmethod
    def inputs(batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``(A, V, L)`` as given in the batch: the model input, already masked / corrupted."""
        return batch["A"], batch["V"], batch["L"]

    @staticmethod
    def clean_inputs(batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``(A, V, L)`` clean features: ``"*_clean"`` when the batch went through ``corrupt_batch``, otherwise the
        features themselves (a collated batch always carries the clean features)."""
        return tuple(batch.get(f"{m}_clean", batch[m]) for m in DATA_ORDER)  # type: ignore[return-value]

    @staticmethod
    def missing_index(batch: Mapping[str, Tensor]) -> Tensor:
        """``[B, 3]`` presence mask (A, V, L; 1 = present); all ones when the batch carries none."""
        mi = batch.get("missing_index")
        if mi is None:
            a = batch["A"]
            return torch.ones(a.shape[0], 3, dtype=torch.long, device=a.device)
        return mi

    @classmethod
    def masked_clean_inputs(
        cls, batch: Mapping[str, Tensor], keep: str = "present"
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Clean features times a per-sample modality mask.

        ``keep="present"``: ``x_clean * missing_index`` (what the zero-corrupted input is);
        ``keep="missing"``: ``x_clean * (1 - missing_index)`` — MMIN's "reversed" input, in which only the missing
        modalities are present, fed to the teacher to build the imagination target.
        """
        if keep not in ("present", "missing"):
            raise ValueError(f"keep must be 'present' or 'missing', got {keep!r}")
        mi = cls.missing_index(batch)
        out = []
        for j, x in enumerate(cls.clean_inputs(batch)):
            w = mi[:, j].to(x.dtype)
            if keep == "missing":
                w = 1 - w
            out.append(x * w.view(-1, *([1] * (x.dim() - 1))))
        return tuple(out)  # type: ignore[return-value]

    @staticmethod
    def lengths(batch: Mapping[str, Tensor]) -> Tensor | None:
        """``[B, 3]`` valid lengths (A, V, L) or None."""
        return batch.get("lengths")

    def predict(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Predicted class indices ``[B]`` (eval mode is the caller's business)."""
        return self(batch).argmax(dim=-1)
