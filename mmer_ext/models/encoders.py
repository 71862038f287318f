"""Building blocks shared by the MMIN family (MMIN, IF-MMIN, NMER): modality encoders, classifier heads and the
cascade residual autoencoders.

Every shape and layer order here follows the authors' code of MMIN (github.com/AIM3-RUC/MMIN) and IF-MMIN (github.com/ZhuoYulang/IF-MMIN) (their ``utt_fusion`` / ``mmin`` /
``IF-MMIN`` networks); the code is written from that description, not copied.

The three utterance encoders map a padded sequence ``[B, T, D_m]`` to one ``[B, 128]`` vector:

* A, V: :class:`LSTMEncoder` (1-layer unidirectional LSTM, max-pool over time);
* L: :class:`TextCNN` (three convolutions over 3/4/5 consecutive frames, global max-pool, Linear + ReLU).

They are fused as ``[a, l, v]`` (order A, L, V, as the authors do), see :func:`fuse` and :data:`FUSION_ORDER`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "FUSION_ORDER",
    "FcClassifier",
    "LSTMEncoder",
    "ModalityEncoders",
    "ResidualAE",
    "ResidualXE",
    "SharedEncoder",
    "TextCNN",
    "fuse",
    "kaiming_init_",
]

#: Order of the modalities in every fused 3 x 128 = 384 vector (the authors' ``torch.cat([A, L, V])``). Note that it
#: differs from the data order ``MODALITIES = ("A", "V", "L")`` used by ``missing_index`` and ``lengths``.
FUSION_ORDER: tuple[str, str, str] = ("A", "L", "V")

_NEG_INF = float("-inf")


def _dims_tuple(dims) -> tuple[int, int, int]:
    """``(A, V, L)`` input sizes from a ``ModalityDims``, a mapping or a 3-sequence in A, V, L order."""
    if isinstance(dims, Mapping):
        return int(dims["A"]), int(dims["V"]), int(dims["L"])
    if hasattr(dims, "A") and hasattr(dims, "V") and hasattr(dims, "L"):
        return int(dims.A), int(dims.V), int(dims.L)
    a, v, l = dims  # noqa: E741
    return int(a), int(v), int(l)


def _valid_mask(lengths: Tensor, steps: int) -> Tensor:
    """``[B, steps]`` bool, True on frames ``t < max(length, 1)``.

    A length of 0 (an empty sequence) keeps frame 0, so pooling never sees an all-masked row (its output would be
    ``-inf``); frame 0 of an empty sequence is a zero padding frame, which is what the unmasked model sees anyway.
    """
    lengths = lengths.to(device=lengths.device, dtype=torch.long).clamp(min=1)
    return torch.arange(steps, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


class LSTMEncoder(nn.Module):
    """Utterance-level encoder for the acoustic and visual streams: a 1-layer unidirectional LSTM and a pooling.

    Parameters
    ----------
    input_size : int
        Feature size of a frame (130 for IEMOCAP ComParE, 342 for the DenseNet face features).
    hidden_size : int
        LSTM size = output size (128 in every script).
    embd_method : {"maxpool", "last", "attention"}
        How the ``[B, T, hidden]`` LSTM outputs become one vector. ``"maxpool"`` is what the scripts use.
        ``"last"`` takes the output at the last valid frame, ``"attention"`` a softmax-weighted sum of the outputs
        with scores ``w . tanh(W h_t + b)``.

    Notes
    -----
    Padding: the authors run the LSTM over the zero-padded batch and max-pool over **all** ``T_max`` frames, so the
    LSTM outputs on the padding frames (non-zero, because of the biases and the carried state) take part in the max
    and an utterance's embedding depends on the length of the longest one in its batch. When ``lengths`` is given we
    pool over the valid frames only (and ``"last"`` takes frame ``length - 1``), which is the intent "one vector per
    utterance"; with ``lengths=None`` the behaviour is the authors'. A unidirectional LSTM's outputs at the valid
    frames do not depend on the trailing padding, so no packing is needed.
    """

    def __init__(self, input_size: int, hidden_size: int = 128, embd_method: str = "maxpool") -> None:
        super().__init__()
        if embd_method not in ("maxpool", "last", "attention"):
            raise ValueError(f"LSTMEncoder: embd_method must be maxpool, last or attention, got {embd_method!r}")
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.embd_method = embd_method
        self.rnn = nn.LSTM(self.input_size, self.hidden_size, num_layers=1, batch_first=True)
        if embd_method == "attention":
            self.attention_layer = nn.Sequential(nn.Linear(self.hidden_size, self.hidden_size), nn.Tanh())
            self.attention_vector = nn.Parameter(torch.empty(self.hidden_size))
            nn.init.normal_(self.attention_vector, std=self.hidden_size**-0.5)

    @property
    def output_size(self) -> int:
        return self.hidden_size

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``x`` ``[B, T, input_size]`` (batch first, zero-padded), ``lengths`` ``[B]`` or None -> ``[B, hidden]``."""
        if x.dim() != 3:
            raise ValueError(f"LSTMEncoder: x must be [B, T, D], got shape {tuple(x.shape)}")
        out, _ = self.rnn(x)  # [B, T, H]
        mask = None if lengths is None else _valid_mask(lengths.to(x.device), out.shape[1])
        if self.embd_method == "maxpool":
            if mask is not None:
                out = out.masked_fill(~mask.unsqueeze(-1), _NEG_INF)
            return out.amax(dim=1)
        if self.embd_method == "last":
            if mask is None:
                return out[:, -1]
            last = mask.long().sum(1) - 1  # >= 0 by _valid_mask
            return out[torch.arange(out.shape[0], device=out.device), last]
        scores = self.attention_layer(out) @ self.attention_vector  # [B, T]
        if mask is not None:
            scores = scores.masked_fill(~mask, _NEG_INF)
        weights = torch.softmax(scores, dim=1)
        return (weights.unsqueeze(-1) * out).sum(1)


class TextCNN(nn.Module):
    """Utterance-level encoder for the lexical stream (word-level BERT-large features, 1024).

    Three convolutions over ``k`` consecutive frames (``k`` in ``kernel_heights``) with ``channels`` filters each,
    ReLU, global max-pool over time, concatenation (``3 * channels``), dropout, ``Linear(3 * channels, embd_size)``
    and ReLU. A ``Conv2d(1, C, (k, D))`` over the ``[T, D]`` "image", as the authors write it, is the same map as the
    ``Conv1d(D, C, k)`` used here (same parameter count and fan-in), only cheaper.

    Parameters
    ----------
    input_size : int
        Feature size of a token (1024).
    embd_size : int
        Output size (128).
    kernel_heights : sequence of int
        Window lengths (3, 4, 5).
    channels : int
        Filters per window length (128).
    dropout : float
        Dropout on the concatenated pooled features (0.5).

    Notes
    -----
    Sequences shorter than the largest window are zero-padded up to it (the authors' features are padded to a fixed
    length, so they never meet this case; without it the convolution would fail). With ``lengths`` given, only the
    windows that start inside the utterance and do not run past its end are pooled (at least the first window), the
    same "valid frames" rule as :class:`LSTMEncoder` (frames past the length are read as zeros); with
    ``lengths=None`` all windows are pooled, as the authors do.
    """

    def __init__(
        self,
        input_size: int = 1024,
        embd_size: int = 128,
        kernel_heights: Sequence[int] = (3, 4, 5),
        channels: int = 128,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.input_size = int(input_size)
        self.embd_size = int(embd_size)
        self.kernel_heights = tuple(int(k) for k in kernel_heights)
        self.convs = nn.ModuleList(nn.Conv1d(self.input_size, channels, k) for k in self.kernel_heights)
        self.dropout = nn.Dropout(dropout)
        self.embd = nn.Sequential(nn.Linear(len(self.kernel_heights) * channels, self.embd_size), nn.ReLU())

    @property
    def output_size(self) -> int:
        return self.embd_size

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``x`` ``[B, T, input_size]``, ``lengths`` ``[B]`` or None -> ``[B, embd_size]``."""
        if x.dim() != 3:
            raise ValueError(f"TextCNN: x must be [B, T, D], got shape {tuple(x.shape)}")
        if lengths is not None:
            # Zero the padding: a window of a sequence shorter than the kernel overlaps it, and must see zeros as
            # when the utterance is encoded alone (then zero-padded up to the kernel height).
            x = x * _valid_mask(lengths.to(x.device), x.shape[1]).unsqueeze(-1).to(x.dtype)
        kmax = max(self.kernel_heights)
        if x.shape[1] < kmax:
            x = F.pad(x, (0, 0, 0, kmax - x.shape[1]))
        h = x.transpose(1, 2)  # [B, D, T]
        pooled = []
        for k, conv in zip(self.kernel_heights, self.convs):
            out = F.relu(conv(h))  # [B, C, T - k + 1]
            if lengths is not None:
                n_windows = (lengths.to(out.device).long() - k + 1).clamp(min=1)
                mask = torch.arange(out.shape[2], device=out.device).unsqueeze(0) < n_windows.unsqueeze(1)
                out = out.masked_fill(~mask.unsqueeze(1), _NEG_INF)
            pooled.append(out.amax(dim=2))
        return self.embd(self.dropout(torch.cat(pooled, dim=1)))


class FcClassifier(nn.Module):
    """MLP head: for each hidden size ``Linear -> ReLU -> [BatchNorm1d] -> [Dropout]``, then ``Linear`` to logits.

    Parameters
    ----------
    input_dim : int
        384 (``utt_fusion``), 320 (MMIN / IF-MMIN latents), 768 (``utt_shared``).
    layers : sequence of int
        Hidden sizes, (128, 128) everywhere.
    output_dim : int
        Number of classes.
    dropout : float
        After every hidden activation (0.3 teachers, 0.5 MMIN students, 0.1 NMER); 0 disables it.
    use_bn : bool
        BatchNorm1d after each activation (NMER only).
    """

    def __init__(
        self,
        input_dim: int,
        layers: Sequence[int] = (128, 128),
        output_dim: int = 4,
        dropout: float = 0.3,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        self.input_dim = int(input_dim)
        self.output_dim = int(output_dim)
        blocks: list[nn.Module] = []
        size = self.input_dim
        for width in layers:
            blocks += [nn.Linear(size, int(width)), nn.ReLU()]
            if use_bn:
                blocks.append(nn.BatchNorm1d(int(width)))
            if dropout > 0:
                blocks.append(nn.Dropout(dropout))
            size = int(width)
        self.hidden = nn.Sequential(*blocks)
        self.fc_out = nn.Linear(size, self.output_dim)

    def forward(self, x: Tensor, return_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``[B, input_dim]`` -> logits ``[B, output_dim]`` (and the last hidden activation if asked)."""
        h = self.hidden(x)
        logits = self.fc_out(h)
        return (logits, h) if return_hidden else logits


def _mlp(sizes: Sequence[int], act: type[nn.Module], dropout: float, use_bn: bool) -> nn.Sequential:
    """``Linear`` between consecutive sizes, ``act [BN] [Dropout]`` after every one but the last."""
    blocks: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        blocks.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            blocks.append(act())
            if use_bn:
                blocks.append(nn.BatchNorm1d(sizes[i + 1]))
            if dropout > 0:
                blocks.append(nn.Dropout(dropout))
    return nn.Sequential(*blocks)


class ResidualAE(nn.Module):
    """MMIN's cascade residual autoencoder (CRA), exactly as the authors' ``ResidualAE`` (MMIN, Zhao et al., ACL 2021; github.com/AIM3-RUC/MMIN).

    ``n_blocks`` autoencoders, block ``i``: encoder ``Lin(in, 256)-LReLU-Lin(256, 128)-LReLU-Lin(128, 64)``, decoder
    ``Lin(64, 128)-ReLU-Lin(128, 256)-ReLU-Lin(256, in)``. With ``x_out_0 = 0``::

        x_in <- x_in + x_out          (block input: the running sum of x and all earlier residuals)
        latent_i = enc_i(x_in);  x_out = dec_i(latent_i)
        recon = transition(x_in + x_out),  transition = Lin(in, in)-ReLU-Lin(in, in)

    Parameters
    ----------
    layers : sequence of int
        Encoder widths (256, 128, 64); the decoder mirrors them.
    n_blocks : int
        5.
    input_dim : int
        384 (the fused ``[a, l, v]``).
    dropout, use_bn : float, bool
        Off in MMIN (0.0, False); applied after the hidden activations when on.

    Returns (forward)
    -----------------
    ``(recon [B, input_dim], latent [B, n_blocks * layers[-1]])`` — 384 and 5 x 64 = 320 for MMIN.
    """

    def __init__(
        self,
        layers: Sequence[int] = (256, 128, 64),
        n_blocks: int = 5,
        input_dim: int = 384,
        dropout: float = 0.0,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        self.input_dim = int(input_dim)
        self.n_blocks = int(n_blocks)
        layers = [int(w) for w in layers]
        self.latent_dim = self.n_blocks * layers[-1]
        enc_sizes = [self.input_dim, *layers]
        dec_sizes = enc_sizes[::-1]
        self.encoders = nn.ModuleList(_mlp(enc_sizes, nn.LeakyReLU, dropout, use_bn) for _ in range(self.n_blocks))
        self.decoders = nn.ModuleList(_mlp(dec_sizes, nn.ReLU, dropout, use_bn) for _ in range(self.n_blocks))
        self.transition = nn.Sequential(
            nn.Linear(self.input_dim, self.input_dim), nn.ReLU(), nn.Linear(self.input_dim, self.input_dim)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_in = x
        x_out = torch.zeros_like(x)
        latents = []
        for encoder, decoder in zip(self.encoders, self.decoders):
            x_in = x_in + x_out
            latent = encoder(x_in)
            x_out = decoder(latent)
            latents.append(latent)
        return self.transition(x_in + x_out), torch.cat(latents, dim=-1)


class ResidualXE(ResidualAE):
    """IF-MMIN's invariant-aware cascade autoencoder (IF-MMIN, Zuo et al., ICASSP 2023; github.com/ZhuoYulang/IF-MMIN): the same blocks as :class:`ResidualAE`, but every
    block sees the previous block's reconstruction plus the invariant features ``S`` instead of a running sum::

        x_out = x
        for each block:  x_in = x_out + S;  latent_i = enc_i(x_in);  x_out = dec_i(latent_i)
        recon = transition(x_out)

    ``forward(x [B, in], invariant [B, in]) -> (recon [B, in], latent [B, n_blocks * 64])``.
    """

    def forward(self, x: Tensor, invariant: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if invariant.shape != x.shape:
            raise ValueError(
                f"ResidualXE: invariant must have the shape of x {tuple(x.shape)}, got {tuple(invariant.shape)}"
            )
        x_out = x
        latents = []
        for encoder, decoder in zip(self.encoders, self.decoders):
            latent = encoder(x_out + invariant)
            x_out = decoder(latent)
            latents.append(latent)
        return self.transition(x_out), torch.cat(latents, dim=-1)


class SharedEncoder(nn.Module):
    """IF-MMIN's modality-invariant projection (default branch): ``Lin(d, d)-LReLU-Lin(d, d)-LReLU``, applied with the
    same weights to every modality's 128-d embedding so that CMD can pull the three distributions together.

    The authors' ``SharedEncoder`` picks one of several stacks from substrings of the command line's ``run_idx``
    (``V0200``: four Linear layers with sigmoids; ``V05xx``/``V0600``: one or two LeakyReLU layers, some with dropout;
    anything else: this one). Their scripts leave ``run_idx`` to the caller, so the branch behind the published
    numbers is not recorded; the default branch is an inference (it is what the NMER repository's teacher runs,
    ``run0001``/``run0002``, get)."""

    def __init__(self, dim: int = 128) -> None:
        super().__init__()
        self.dim = int(dim)
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(), nn.Linear(dim, dim), nn.LeakyReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ModalityEncoders(nn.Module):
    """The three utterance encoders of the MMIN family: ``A``/``V`` :class:`LSTMEncoder`, ``L`` :class:`TextCNN`.

    Parameters
    ----------
    dims : ModalityDims or (A, V, L)
        Input feature sizes.
    hidden : int
        Embedding size of every modality (128).
    embd_method_a, embd_method_v : str
        Pooling of the LSTM encoders ("maxpool" in every script).
    text_dropout : float
        TextCNN dropout (0.5).
    use_lengths : bool
        Pool over valid frames only when ``lengths`` is passed to :meth:`forward` (see :class:`LSTMEncoder` for why);
        False ignores ``lengths`` (the authors' behaviour).

    ``forward(A, V, L, lengths=None) -> {"A", "V", "L": [B, hidden]}``; ``lengths`` is the batch's ``[B, 3]`` in
    A, V, L order. Submodules are named ``A``, ``V``, ``L`` so a student can deep-copy one of them from a teacher.
    """

    def __init__(
        self,
        dims,
        hidden: int = 128,
        *,
        embd_method_a: str = "maxpool",
        embd_method_v: str = "maxpool",
        text_dropout: float = 0.5,
        use_lengths: bool = True,
    ) -> None:
        super().__init__()
        da, dv, dl = _dims_tuple(dims)
        self.hidden = int(hidden)
        self.use_lengths = bool(use_lengths)
        self.A = LSTMEncoder(da, self.hidden, embd_method_a)
        self.V = LSTMEncoder(dv, self.hidden, embd_method_v)
        self.L = TextCNN(dl, self.hidden, dropout=text_dropout)

    @property
    def fused_dim(self) -> int:
        return 3 * self.hidden

    def forward(self, A: Tensor, V: Tensor, L: Tensor, lengths: Tensor | None = None) -> dict[str, Tensor]:
        if lengths is None or not self.use_lengths:
            la = lv = ll = None
        else:
            la, lv, ll = lengths[:, 0], lengths[:, 1], lengths[:, 2]
        return {"A": self.A(A, la), "V": self.V(V, lv), "L": self.L(L, ll)}


def fuse(feats: Mapping[str, Tensor]) -> Tensor:
    """Concatenate per-modality features in the fusion order ``[a, l, v]`` (:data:`FUSION_ORDER`) -> ``[B, 3 d]``."""
    return torch.cat([feats[m] for m in FUSION_ORDER], dim=-1)


@torch.no_grad()
def kaiming_init_(module: nn.Module) -> nn.Module:
    """The authors' ``init_weights(init_type="kaiming")``: Kaiming-normal (fan-in, gain for ReLU) weights and zero
    bias on every ``Linear`` and convolution, ``N(1, 0.02)`` weight / zero bias on BatchNorm, and PyTorch's default
    init left on LSTMs (the authors' class-name test never matches ``LSTM``). Returns ``module`` (in place)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return module
