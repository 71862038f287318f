"""The MulT cross-modal transformer (Tsai et al., ACL 2019) as IMDer uses it for fusion (IMDer, Wang et al., NeurIPS 2023; github.com/mdswyz/IMDer).

:class:`TransformerEncoder` is the pre-LN encoder of MulT: the query sequence (and, for cross-modal attention, the
key/value sequence) is scaled by ``sqrt(d)``, gets sinusoidal positions and embedding dropout; every layer normalises
query and key/value with the *same* LayerNorm, attends under an optional causal mask and applies a ReLU feed-forward
block (4d); a final LayerNorm closes the stack. The key/value sequence is normalised afresh by every layer but never
updated (it is the source modality). As in the authors' code, keys and values are embedded separately, so each gets
its own embedding-dropout mask, and every projection (attention in/out, feed-forward) starts Xavier-uniform with zero
bias. The same encoder is the cross-attention of the IMDer score network.

:class:`MulT` is the recognition backbone: six cross-modal encoders (each target modality attends to each source),
three self-attention "memory" encoders over the concatenated pair (width 2d) in the authors' order (L from
[L<-A, L<-V], A from [A<-L, A<-V], V from [V<-L, V<-A]: the order matters, the memory encoder adds positions over the
concatenated channels), the last time step of each, a residual MLP head and the output layer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mmer_ext.ops.attention import attention

__all__ = ["MEM_SOURCES", "MulT", "TransformerEncoder", "attend", "future_mask", "sinusoidal_positions"]

_MODALITIES = ("A", "V", "L")
# The two cross-modal outputs each memory encoder concatenates, in the authors' order (their trans_{m}_mem inputs).
MEM_SOURCES = {"L": ("A", "V"), "A": ("L", "V"), "V": ("L", "A")}


def sinusoidal_positions(length: int, dim: int, *, device=None, dtype=torch.float32) -> Tensor:
    """``[length, dim]`` fairseq-style sinusoidal embedding of positions ``1 .. length``.

    The first ``dim // 2`` columns are ``sin(p * w_k)``, the next ``dim // 2`` ``cos(p * w_k)`` with
    ``w_k = 10000 ** (-k / (dim // 2 - 1))``; an odd ``dim`` leaves the last column zero.

    MulT derives the positions from the input and gives position 0 (a zero vector) to time steps whose first
    feature is exactly 0, treating them as padding; here every step gets its position, since the projected
    features IMDer feeds in are not padded that way.
    """
    half = dim // 2
    pos = torch.arange(1, length + 1, device=device, dtype=torch.float32).unsqueeze(1)
    if half == 0:
        return torch.zeros(length, dim, device=device, dtype=dtype)
    # half == 1 would divide by zero in the fairseq formula; a single frequency of 1 is the limit it means.
    step = math.log(10000.0) / (half - 1) if half > 1 else 0.0
    freqs = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * -step)
    angles = pos * freqs.unsqueeze(0)
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.to(dtype)


def future_mask(q_len: int, k_len: int, *, device=None) -> Tensor:
    """``[q_len, k_len]`` boolean mask, True where attention is *blocked*: query ``i`` sees keys
    ``j <= i + |k_len - q_len|`` (MulT's ``triu(-inf, 1 + |Lk - Lq|)``; the plain causal mask when the lengths
    are equal). Every query keeps at least key 0, so no softmax row is empty."""
    offset = 1 + abs(k_len - q_len)
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).triu(offset)


def _head_count(dim: int, wanted: int) -> int:
    """Largest head count ``<= wanted`` that divides ``dim`` (small test configurations)."""
    for h in range(max(1, min(wanted, dim)), 0, -1):
        if dim % h == 0:
            return h
    return 1


def attend(attn: nn.MultiheadAttention, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
           training: bool, causal: bool = False) -> Tensor:
    """``attn(q, k, v, attn_mask=mask, need_weights=False)[0]`` for a batch-first module, computed from its weights.

    The same maths as :class:`torch.nn.MultiheadAttention` (in-projection, scaled dot product under the blocking mask,
    attention dropout on the weights, out-projection) without the module's own wrapping, which at MulT's sizes on the
    CPU (d = 32 with 8 heads: head width 4) costs as much as the attention itself. One GEMM for the three projections
    of self-attention, two for cross-attention with one key/value sequence. On the CPU the product is
    :func:`mmer_ext.ops.attention` for heads up to 8 wide and wherever attention dropout is on, what it is made for:
    about 2.4x faster than ``scaled_dot_product_attention``'s flash kernel forward + backward at MulT's [32, 8, 48, 4],
    4x with attention dropout (which sends SDPA to its unfused path), and its output is already in the
    heads-interleaved layout, so merging the heads copies nothing (``benchmarks/bench_attention.py``). Wider heads
    without dropout (the U-Net score net's 16) keep SDPA, whose backward is faster there. On CUDA,
    ``scaled_dot_product_attention`` (``causal=True``: ``mask`` is the plain causal mask and the kernel's causal flag
    replaces it).
    """
    b, lq, e = q.shape
    lk = k.shape[1]
    h = attn.num_heads
    w, bias = attn.in_proj_weight, attn.in_proj_bias
    if k is q and v is q:
        qh, kh, vh = F.linear(q, w, bias).chunk(3, dim=-1)
    else:
        qh = F.linear(q, w[:e], bias[:e])
        if v is k:
            kh, vh = F.linear(k, w[e:], bias[e:]).chunk(2, dim=-1)
        else:
            kh, vh = F.linear(k, w[e:2 * e], bias[e:2 * e]), F.linear(v, w[2 * e:], bias[2 * e:])
    qh = qh.reshape(b, lq, h, e // h).transpose(1, 2)
    kh = kh.reshape(b, lk, h, e // h).transpose(1, 2)
    vh = vh.reshape(b, lk, h, e // h).transpose(1, 2)
    p = attn.dropout if training else 0.0
    if q.device.type == "cpu" and (e // h <= 8 or p > 0):
        o = attention(qh, kh, vh, mask, p)
    elif causal:
        o = F.scaled_dot_product_attention(qh, kh, vh, dropout_p=p, is_causal=True)
    else:
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=None if mask is None else ~mask, dropout_p=p)
    return F.linear(o.transpose(1, 2).reshape(b, lq, e), attn.out_proj.weight, attn.out_proj.bias)


class _EncoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_dropout: float, relu_dropout: float, res_dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=attn_dropout, batch_first=True)
        self.norm_attn = nn.LayerNorm(dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.relu_dropout, self.res_dropout = float(relu_dropout), float(res_dropout)
        # The authors' init: Xavier-uniform weights, zero biases, for the feed-forward block and the attention's output
        # projection too (nn.MultiheadAttention initialises in_proj the same way but leaves out_proj at Linear's
        # default).
        for fc in (self.fc1, self.fc2, self.attn.out_proj):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor, k: Tensor | None, v: Tensor | None, mask: Tensor | None,
                causal: bool = False) -> Tensor:
        q = self.norm_attn(x)
        if k is None:  # self-attention
            k = v = q
        elif v is k:  # one embedding serves both (no embedding dropout)
            k = v = self.norm_attn(k)
        else:
            k, v = self.norm_attn(k), self.norm_attn(v)
        a = attend(self.attn, q, k, v, mask, self.training, causal)
        x = x + F.dropout(a, self.res_dropout, self.training)
        y = F.dropout(F.relu(self.fc1(self.norm_ffn(x))), self.relu_dropout, self.training)
        return x + F.dropout(self.fc2(y), self.res_dropout, self.training)


class TransformerEncoder(nn.Module):
    """MulT's pre-LN transformer encoder, batch first.

    ``forward(x [B, Lq, D], kv=None | [B, Lk, D]) -> [B, Lq, D]``: self-attention without ``kv``, cross-modal
    attention (queries from ``x``, keys and values from ``kv``) with it. With ``attn_mask=True`` the output at query
    position ``i`` depends only on ``x[:, :i+1]`` and ``kv[:, :i+1+|Lk-Lq|]`` (:func:`future_mask`).

    ``num_heads`` is lowered to the largest divisor of ``embed_dim`` not above it (small configurations).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int = 8,
        layers: int = 2,
        *,
        attn_dropout: float = 0.0,
        relu_dropout: float = 0.0,
        res_dropout: float = 0.0,
        embed_dropout: float = 0.0,
        attn_mask: bool = True,
    ) -> None:
        super().__init__()
        if embed_dim < 1 or layers < 1 or num_heads < 1:
            raise ValueError(f"TransformerEncoder: embed_dim, num_heads and layers must be >= 1, got "
                             f"{embed_dim}, {num_heads}, {layers}")
        self.embed_dim = int(embed_dim)
        self.num_heads = _head_count(self.embed_dim, int(num_heads))
        self.embed_scale = math.sqrt(self.embed_dim)
        self.embed_dropout = float(embed_dropout)
        self.attn_mask = bool(attn_mask)
        self.layers = nn.ModuleList(
            _EncoderLayer(self.embed_dim, self.num_heads, attn_dropout, relu_dropout, res_dropout)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(self.embed_dim)

    def _embed(self, x: Tensor) -> Tensor:
        pos = sinusoidal_positions(x.shape[1], self.embed_dim, device=x.device, dtype=x.dtype)
        return F.dropout(self.embed_scale * x + pos, self.embed_dropout, self.training)

    def forward(self, x: Tensor, kv: Tensor | None = None) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"TransformerEncoder: x must be [B, L, {self.embed_dim}], got {tuple(x.shape)}")
        if kv is not None and (kv.dim() != 3 or kv.shape[0] != x.shape[0] or kv.shape[-1] != self.embed_dim):
            raise ValueError(f"TransformerEncoder: kv must be [{x.shape[0]}, L, {self.embed_dim}], got "
                             f"{tuple(kv.shape)}")
        h = self._embed(x)
        keys = values = None
        if kv is not None:
            keys = self._embed(kv)
            # Keys and values are embedded apart (the authors' x_k, x_v): their own embedding-dropout masks.
            values = self._embed(kv) if self.training and self.embed_dropout > 0 else keys
        mask, k_len = None, h.shape[1] if keys is None else keys.shape[1]
        if self.attn_mask:
            mask = future_mask(h.shape[1], k_len, device=h.device)
        causal = self.attn_mask and k_len == h.shape[1]
        for layer in self.layers:
            h = layer(h, keys, values, mask, causal)
        return self.norm(h)


class MulT(nn.Module):
    """MulT fusion backbone over channel-first features ``a, v, l`` ``[B, d, T]``.

    For each target modality ``m`` (A, V, L) and each other modality ``o``: a cross-modal encoder ``m <- o``
    (queries ``m``, keys/values ``o``; width d, ``nlevels`` layers); the two outputs are concatenated (2d) in the
    authors' order (:data:`MEM_SOURCES`: L from [L<-A, L<-V], A from [A<-L, A<-V], V from [V<-L, V<-A]) and run
    through ``m``'s self-attention memory encoder (``mem_layers`` layers, default ``max(nlevels, 3)``); its last time
    step is kept. The three ``[B, 2d]`` vectors are concatenated in A, V, L order (``combined_dim = 6d``, 192 at
    d = 32; the authors concatenate L, A, V, which only permutes the head's weights, see
    :mod:`mmer_ext.models.imder_convert`), passed through ``proj2(dropout(relu(proj1(h)))) + h`` and
    ``Linear(6d -> output_dim)``.

    The attention dropout of a cross-modal encoder follows its *source* modality as in the authors' code
    (``attn_dropout_a`` for sources A, ``attn_dropout_v`` for V, ``attn_dropout`` for L and the memory encoders).
    Defaults are the authors' MOSI configuration.
    """

    def __init__(
        self,
        d_model: int = 32,
        num_heads: int = 8,
        nlevels: int = 4,
        *,
        output_dim: int = 1,
        mem_layers: int | None = None,
        attn_dropout: float = 0.0,
        attn_dropout_a: float = 0.2,
        attn_dropout_v: float = 0.0,
        relu_dropout: float = 0.0,
        res_dropout: float = 0.0,
        embed_dropout: float = 0.2,
        out_dropout: float = 0.0,
        attn_mask: bool = True,
    ) -> None:
        super().__init__()
        if d_model < 1 or nlevels < 1 or output_dim < 1:
            raise ValueError(f"MulT: d_model, nlevels and output_dim must be >= 1, got {d_model}, {nlevels}, "
                             f"{output_dim}")
        self.d_model = int(d_model)
        self.combined_dim = 6 * self.d_model
        self.out_dropout = float(out_dropout)
        mem_layers = max(int(nlevels), 3) if mem_layers is None else int(mem_layers)
        source_dropout = {"A": attn_dropout_a, "V": attn_dropout_v, "L": attn_dropout}
        common = dict(relu_dropout=relu_dropout, res_dropout=res_dropout, embed_dropout=embed_dropout,
                      attn_mask=attn_mask)
        self.cross = nn.ModuleDict()
        for m in _MODALITIES:
            for o in _MODALITIES:
                if o != m:
                    self.cross[f"{m}{o}"] = TransformerEncoder(self.d_model, num_heads, nlevels,
                                                               attn_dropout=source_dropout[o], **common)
        self.mem = nn.ModuleDict({
            m: TransformerEncoder(2 * self.d_model, num_heads, mem_layers, attn_dropout=attn_dropout, **common)
            for m in _MODALITIES
        })
        self.proj1 = nn.Linear(self.combined_dim, self.combined_dim)
        self.proj2 = nn.Linear(self.combined_dim, self.combined_dim)
        self.out_layer = nn.Linear(self.combined_dim, int(output_dim))

    def features(self, a: Tensor, v: Tensor, l: Tensor) -> Tensor:  # noqa: E741 - the modality's name
        """``[B, 6d]``: the concatenated last steps of the three memory encoders (before the head)."""
        seqs = {}
        for name, x in zip(_MODALITIES, (a, v, l)):
            if x.dim() != 3 or x.shape[1] != self.d_model:
                raise ValueError(f"MulT: {name} must be [B, {self.d_model}, T], got {tuple(x.shape)}")
            seqs[name] = x.transpose(1, 2)
        if len({s.shape[0] for s in seqs.values()}) != 1:
            raise ValueError("MulT: a, v and l must have the same batch size")
        last = []
        for m in _MODALITIES:
            pair = [self.cross[f"{m}{o}"](seqs[m], seqs[o]) for o in MEM_SOURCES[m]]
            last.append(self.mem[m](torch.cat(pair, dim=2))[:, -1])
        return torch.cat(last, dim=1)

    def head(self, h: Tensor) -> Tensor:
        """Residual MLP and output layer on ``[B, 6d]`` features -> ``[B, output_dim]``."""
        z = self.proj2(F.dropout(F.relu(self.proj1(h)), self.out_dropout, self.training)) + h
        return self.out_layer(z)

    def forward(self, a: Tensor, v: Tensor, l: Tensor) -> Tensor:  # noqa: E741
        """``[B, output_dim]``."""
        return self.head(self.features(a, v, l))
