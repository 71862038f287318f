"""Load the authors' IMDer checkpoints (``pt/pretrained-{mosi,mosei}.pth``, ``pt/imder-{mosi,mosei}.pth`` of
``mdswyz/IMDer``) into :class:`~mmer_ext.models.imder.IMDer`.

Their files are ``torch.save(model.state_dict())`` of their ``IMDER`` module (the pretrained ones with a ``Model.``
prefix, which their trainer strips). The layouts differ only in names and in three orders:

=====================================================  ===========================================================
theirs                                                 ours
=====================================================  ===========================================================
``proj_{l,a,v}``                                       ``proj.{L,A,V}``
``cat_va``, ``cat_la``, ``cat_lv`` (inputs V|A, L|A,   ``fuse.AV``, ``fuse.AL``, ``fuse.VL`` (inputs A|V, A|L, V|L:
L|V)                                                   the two input halves of the 1x1 conv are swapped)
``score_{l,v,a}``: ``embed``, ``conv1..4`` (+         ``score.{L,V,A}``: ``time_embed``, ``down.0..3`` (``conv``,
``_cond``), ``attention_1..4``, ``dense1..4.dense``,   ``cond_conv``, ``attn``, ``dense``, ``norm``), ``up.0..2``
``gnorm1..4``, ``tconv4..2`` (+ ``_cond``),            (``tconv4..2``, ``attention_t4..t2``, ``dense5..7``,
``attention_t4..t2``, ``dense5..7``, ``tgnorm4..2``,   ``tgnorm4..2``), ``out`` (``tconv1``, ``attention_t1``)
``tconv1``, ``attention_t1``
``rec_{l,v,a}`` (RCAN ``CALayer.conv_du``)             ``refine.{L,V,A}`` (``_ChannelAttention.gate``)
``trans_{m}_with_{o}``, ``trans_{m}_mem``              ``fusion.cross.{M}{O}``, ``fusion.mem.{M}``
encoder layers: ``self_attn``, ``layer_norms.0/1``,    ``attn``, ``norm_attn`` / ``norm_ffn``, ``norm``
``layer_norm``; buffers ``version``,
``embed_positions._float_tensor`` (dropped)
``proj1``, ``proj2``, ``out_layer`` on [L, A, V]       ``fusion.proj1/proj2/out_layer`` on [A, V, L]: the head's
                                                       input columns (and ``proj2``'s output rows, which the
                                                       residual adds to the input) are permuted
``text_model.model`` (their BERT)                      ``bert`` with ``text_encoder=``, else dropped (the model
                                                       then reads precomputed features of that BERT as ``L``)
=====================================================  ===========================================================

The memory encoders take their two cross-modal outputs in the authors' order in our MulT too
(:data:`mmer_ext.models.mult.MEM_SOURCES`); that order cannot be permuted away (positions are added over the
concatenated channels), which is why MulT follows it. The converted model keeps the authors' condition mode
(``condition_noise="shared"``): their score networks were trained with it.

Architecture sizes are read from the tensors' shapes (feature dims, width, MulT levels, score-network widths, RCAN
blocks); head counts cannot be, and are the authors' 8 unless given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmer_ext.train.checkpoint import CheckpointError

__all__ = ["AuthorsCheckpointError", "authors_hparams", "convert_authors_checkpoint", "convert_authors_state_dict",
           "load_authors_state_dict"]

_MOD = {"l": "L", "a": "A", "v": "V"}
# Their pair convs concatenate (first, second); ours concatenate in A, V, L order: every pair is swapped.
_FUSE = {"cat_va": "AV", "cat_la": "AL", "cat_lv": "VL"}
_HEAD_ORDER = ("L", "A", "V")  # their concat of the memory encoders' last steps
_OUR_ORDER = ("A", "V", "L")


class AuthorsCheckpointError(CheckpointError):
    """A file that is not an IMDer state dict in the authors' layout; the message names what is wrong."""


def load_authors_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of an authors' ``*.pth`` (read with ``weights_only=True``: no code runs), ``Model.`` stripped."""
    path = Path(path)
    if not path.is_file():
        raise AuthorsCheckpointError(f"{str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that needs more than tensors, or not a torch file at all
        raise AuthorsCheckpointError(f"{str(path)!r} is not a torch state dict readable with weights_only=True: "
                                     f"{type(e).__name__}: {e}") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise AuthorsCheckpointError(f"{str(path)!r} does not hold a flat state dict of tensors")
    return {(k[len("Model."):] if k.startswith("Model.") else k): v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------------------------
# names


def _encoder_key(rest: str) -> str | None:
    """Inside one of their TransformerEncoders: our name, or None for their buffers (dropped)."""
    if rest in ("version", "embed_positions._float_tensor"):
        return None
    if rest.startswith("layer_norm."):
        return "norm." + rest[len("layer_norm."):]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", rest)
    if m is None:
        raise AuthorsCheckpointError(f"unexpected transformer-encoder tensor {rest!r}")
    i, inner = m.groups()
    for theirs, ours in (("self_attn.", "attn."), ("layer_norms.0.", "norm_attn."), ("layer_norms.1.", "norm_ffn."),
                         ("fc1.", "fc1."), ("fc2.", "fc2.")):
        if inner.startswith(theirs):
            return f"layers.{i}.{ours}{inner[len(theirs):]}"
    raise AuthorsCheckpointError(f"unexpected transformer-encoder tensor {rest!r}")


def _score_key(rest: str, levels: int) -> str | None:
    """Inside one of their ScoreNets (``levels`` encoder levels: 4 in theirs)."""
    head, _, tail = rest.partition(".")
    if head == "embed":
        return "time_embed." + tail
    m = re.fullmatch(r"(conv|attention_|dense|gnorm)(\d)(_cond)?", head)
    if m is not None:
        kind, k, cond = m.group(1), int(m.group(2)), m.group(3)
        level = f"down.{k - 1}."
        if kind == "conv":
            return level + ("cond_conv." if cond else "conv.") + tail
        if kind == "attention_":
            out = _encoder_key(tail)
            return None if out is None else level + "attn." + out
        if kind == "dense":
            # dense1..4 belong to the encoder levels, dense5..7 continue the numbering down the decoder
            level = level if k <= levels else f"up.{k - levels - 1}."
            return level + "dense." + tail.removeprefix("dense.")
        return level + "norm." + tail
    m = re.fullmatch(r"(tconv|attention_t|tgnorm)(\d)(_cond)?", head)
    if m is not None:
        kind, k, cond = m.group(1), int(m.group(2)), m.group(3)
        level = "out." if k == 1 else f"up.{levels - k}."
        if kind == "tconv":
            return level + ("cond_conv." if cond else "conv.") + tail
        if kind == "attention_t":
            out = _encoder_key(tail)
            return None if out is None else level + "attn." + out
        return level + "norm." + tail
    raise AuthorsCheckpointError(f"unexpected score-network tensor {rest!r}")


def _head_permutation(d: int) -> Tensor:
    """Indices into their [L, A, V] head input giving our [A, V, L] (each block 2d wide)."""
    block = 2 * d
    return torch.cat([torch.arange(block) + block * _HEAD_ORDER.index(m) for m in _OUR_ORDER])


def _count(state: Mapping[str, Tensor], pattern: str) -> int:
    found = {m.group(1) for k in state for m in [re.fullmatch(pattern, k)] if m}
    return len(found)


def authors_hparams(state: Mapping[str, Tensor], *, num_heads: int = 8, score_heads: int = 8) -> dict[str, Any]:
    """The :class:`~mmer_ext.models.imder.IMDer` architecture arguments (and ``dims``, ``num_classes``) of an
    authors' state dict, read from its shapes."""
    try:
        d, dim_l, kernel = state["proj_l.weight"].shape
        dims = (int(state["proj_a.weight"].shape[1]), int(state["proj_v.weight"].shape[1]), int(dim_l))
        levels = _count(state, r"score_l\.conv(\d)\.weight")
        widths = tuple(int(state[f"score_l.conv{k}.weight"].shape[0]) for k in range(1, levels + 1))
        hp = dict(
            dims=dims,
            num_classes=int(state["out_layer.weight"].shape[0]),
            d_model=int(d),
            nlevels=_count(state, r"trans_l_with_a\.layers\.(\d+)\..*"),
            num_heads=int(num_heads),
            proj_kernel=int(kernel),
            score_channels=widths,
            score_heads=int(score_heads),
            score_layers=_count(state, r"score_l\.attention_1\.layers\.(\d+)\..*"),
            score_embed_dim=int(state["score_l.embed.1.weight"].shape[0]),
            rcab_blocks=_count(state, r"rec_l\.1\.body\.(\d+)\.body\.0\.weight"),
            rcab_reduction=int(state["rec_l.1.body.0.body.3.conv_du.2.weight"].shape[0]
                               // state["rec_l.1.body.0.body.3.conv_du.0.weight"].shape[0]),
            score_net="unet",
            score_ema=None,  # their checkpoints hold no EMA of the score weights; their samplers read the live nets
            refine_residual=False,  # their rec_* are plain stacks: a residual one would add the sample to its output
        )
    except KeyError as e:
        raise AuthorsCheckpointError(f"not an authors' IMDer state dict: no tensor {e.args[0]!r}") from None
    mem_layers = _count(state, r"trans_l_mem\.layers\.(\d+)\..*")
    if mem_layers != max(hp["nlevels"], 3):
        raise AuthorsCheckpointError(f"the memory encoders have {mem_layers} layers, IMDer's MulT builds "
                                     f"max(nlevels, 3) = {max(hp['nlevels'], 3)}")
    return hp


def convert_authors_state_dict(state: Mapping[str, Tensor], *, with_text_encoder: bool = False) -> dict[str, Tensor]:
    """Our :class:`~mmer_ext.models.imder.IMDer` state dict from theirs (see the module docstring). Their BERT
    (``text_model.model.*``) becomes ``bert.*`` when ``with_text_encoder``, else it is dropped."""
    d = int(state["proj_l.weight"].shape[0]) if "proj_l.weight" in state else None
    if d is None:
        raise AuthorsCheckpointError("not an authors' IMDer state dict: no tensor 'proj_l.weight'")
    levels = _count(state, r"score_l\.conv(\d)\.weight")
    perm = _head_permutation(d)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        new: str | None
        if key.startswith("text_model.model."):
            new = "bert." + key[len("text_model.model."):] if with_text_encoder else None
        elif head in ("proj_l", "proj_a", "proj_v"):
            new = f"proj.{_MOD[head[-1]]}.{rest}"
        elif head in _FUSE:
            new = f"fuse.{_FUSE[head]}.{rest}"
            if rest == "weight":
                value = torch.cat([value[:, d:], value[:, :d]], dim=1)
        elif head in ("score_l", "score_a", "score_v"):
            inner = _score_key(rest, levels)
            new = None if inner is None else f"score.{_MOD[head[-1]]}.{inner}"
        elif head in ("rec_l", "rec_a", "rec_v"):
            new = f"refine.{_MOD[head[-1]]}.{rest.replace('.conv_du.', '.gate.')}"
        elif (m := re.fullmatch(r"trans_([lav])_with_([lav])", head)) is not None:
            inner = _encoder_key(rest)
            new = None if inner is None else f"fusion.cross.{_MOD[m.group(1)]}{_MOD[m.group(2)]}.{inner}"
        elif (m := re.fullmatch(r"trans_([lav])_mem", head)) is not None:
            inner = _encoder_key(rest)
            new = None if inner is None else f"fusion.mem.{_MOD[m.group(1)]}.{inner}"
        elif head in ("proj1", "proj2", "out_layer"):
            new = f"fusion.{key}"
            if head in ("proj1", "out_layer") and rest == "weight":
                value = value[:, perm]
            elif head == "proj2":
                value = value[perm]
        else:
            raise AuthorsCheckpointError(f"unexpected tensor {key!r} in an authors' IMDer state dict")
        if new is not None:
            out[new] = value.detach().clone().contiguous()
    return out


def convert_authors_checkpoint(source: str | Path, destination: str | Path, *, text_encoder: str | None = None,
                               dataset: str | None = None, num_heads: int = 8) -> Path:
    """Write ``destination/model.safetensors``: the authors' checkpoint ``source`` as a package IMDer that
    :func:`mmer_ext.train.load_model` (``mmer-ext evaluate``, ``mmer-ext train --teacher``) reads.

    ``dataset`` (``"mosi"`` / ``"mosei"``) picks the authors' configuration for the dropouts and clipping; by default
    it is read from the feature sizes (MOSI: A 5, V 20; MOSEI: A 74, V 35) or else the MulT depth (4 / 6). The
    model keeps their condition mode, ``"shared"``.
    """
    from mmer_ext.models.imder import IMDer
    from mmer_ext.train.checkpoint import save_weights
    from mmer_ext.train.config import load_config
    from mmer_ext.train.trainer import _model_metadata, build_models, resolve_stages

    state = load_authors_state_dict(source)
    hp = authors_hparams(state, num_heads=num_heads, score_heads=num_heads)
    dims, num_classes = hp.pop("dims"), hp.pop("num_classes")
    if dataset is None:
        dataset = {(5, 20): "mosi", (74, 35): "mosei"}.get(dims[:2], "mosei" if hp["nlevels"] == 6 else "mosi")
    if dataset not in ("mosi", "mosei"):
        raise ValueError(f"dataset must be 'mosi' or 'mosei', got {dataset!r}")
    has_bert = any(k.startswith("text_model.model.") for k in state)
    hp["condition_noise"] = "shared"
    if text_encoder is not None:
        if not has_bert:
            raise AuthorsCheckpointError(f"{str(source)!r} holds no BERT (text_model.*) to load into text_encoder")
        hp["text_encoder"] = str(text_encoder)
    recipe = "imder-authors" if dataset == "mosi" else "imder-mosei"
    cfg = load_config(None, model=recipe, missing_protocol="per-batch", progress=False,
                      hparams={"pretrain": dict(hp), "main": dict(hp)})
    stages = resolve_stages(cfg)
    model = build_models(stages, dims, num_classes)[-1]
    assert isinstance(model, IMDer)
    ours = convert_authors_state_dict(state, with_text_encoder=text_encoder is not None)
    expected = model.state_dict()
    if text_encoder is not None:
        # BERT buffers differ between transformers versions (position_ids, ...): take theirs where both have one.
        ours = {k: v for k, v in ours.items() if not k.startswith("bert.") or k in expected}
        ours.update({k: v for k, v in expected.items() if k.startswith("bert.") and k not in ours})
    missing, unexpected = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
    if missing or unexpected:
        raise AuthorsCheckpointError(f"{str(source)!r} does not map onto IMDer{tuple(dims)}: missing {missing[:5]}, "
                                     f"unexpected {unexpected[:5]}")
    for k, v in ours.items():
        if v.shape != expected[k].shape:
            raise AuthorsCheckpointError(f"{str(source)!r}: {k} has shape {tuple(v.shape)}, IMDer expects "
                                         f"{tuple(expected[k].shape)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in ours.items()})
    meta = _model_metadata(cfg, stages, len(stages) - 1, dims, num_classes, ("sentiment",), data_kw={})
    meta["converted_from"] = {"file": Path(source).name, "layout": "mdswyz/IMDer", "dataset": dataset,
                              "bert_dropped": has_bert and text_encoder is None}
    out = Path(destination) / "model.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_weights(out, model, meta)
    return out
