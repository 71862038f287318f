"""IMDer's conditional score network (a 1-D U-Net) and its denoising-score-matching loss (IMDer, Wang et al., NeurIPS 2023; github.com/mdswyz/IMDer).

The network estimates the score ``grad_x log p_t(x | c)`` of the VE SDE ``dx = sigma^t dw`` (sigma = 25) for a
missing modality's projected features ``x`` ``[B, C, L]`` (C = 32, L = 48 in IMDer), conditioned on features ``c`` of
the available modalities with the same shape::

    emb   = swish(Linear(GaussianFourierProjection(t)))                       # [B, 256]
    level k (encoder, lengths 48 -> 24 -> 12 -> 6):
        h  = conv_k(h)                       # k3, stride 1 then 2, 2, 2; no bias
        c  = cond_conv_k(c)                  # the condition's own path to the same shape
        h += CrossAttn_k(h <- c)             # MulT TransformerEncoder, causal mask, 2 layers
        h  = swish(GroupNorm(h + Dense_k(emb)))
    decoder: ConvTranspose (k3, s2) back up, the encoder outputs concatenated as skips, the same block at each level;
    the last (stride 1, to C channels) only adds its cross-attention.
    score = h / std(t)

Widths, head and layer counts are configurable so tests can shrink the net; GroupNorm's group count is lowered to
``gcd(groups, channels)`` and the head count to a divisor of the width when a small width needs it. Lengths that
are not multiples of 8 work too: the transposed convolutions are told the skip lengths.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mmer_ext.models.mult import TransformerEncoder
from mmer_ext.ops import ve_marginal_std, ve_perturb
from mmer_ext.sampling.functional import CONDITION_MODES

__all__ = ["FrameScoreNet", "GaussianFourierProjection", "ScoreNet", "dsm_loss"]


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of the diffusion time: ``[sin(2 pi t W), cos(2 pi t W)]``, ``W ~ N(0, scale^2)``.

    ``W`` is drawn once at construction (from torch's global RNG) and never trained; it is a buffer, so it is saved
    with the model and follows ``.to(device)``.
    """

    def __init__(self, embed_dim: int = 256, scale: float = 30.0) -> None:
        super().__init__()
        if embed_dim < 2 or embed_dim % 2:
            raise ValueError(f"GaussianFourierProjection: embed_dim must be even and >= 2, got {embed_dim}")
        self.register_buffer("W", torch.randn(embed_dim // 2) * float(scale))

    def forward(self, t: Tensor) -> Tensor:
        angles = t.unsqueeze(-1) * self.W.to(t.dtype) * (2 * math.pi)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


def _groups(wanted: int, channels: int) -> int:
    return math.gcd(wanted, channels)


def _resample(conv: nn.Module, x: Tensor, length: int) -> Tensor:
    if isinstance(conv, nn.ConvTranspose1d):
        return conv(x, output_size=[length])
    return conv(x)


class _Level(nn.Module):
    """One U-Net level: resampling conv, the condition's own conv, causal cross-attention over the condition,
    time embedding, GroupNorm + swish (the last decoder level has neither of the last two)."""

    def __init__(
        self,
        conv: nn.Module,
        cond_conv: nn.Module,
        channels: int,
        embed_dim: int,
        *,
        num_heads: int,
        num_layers: int,
        groups: int | None,
        attn_mask: bool,
        cond_skip: bool = False,
    ) -> None:
        super().__init__()
        self.cond_skip = cond_skip
        self.conv = conv
        self.cond_conv = cond_conv
        self.attn = TransformerEncoder(channels, num_heads, num_layers, attn_mask=attn_mask)
        self.dense = nn.Linear(embed_dim, channels) if groups is not None else None
        self.norm = nn.GroupNorm(_groups(groups, channels), channels) if groups is not None else None

    def forward(self, h: Tensor, cond: Tensor | None, emb: Tensor, length: int) -> tuple[Tensor, Tensor | None]:
        h = _resample(self.conv, h, length)
        if cond is not None:
            cond = _resample(self.cond_conv, cond, length)
            h = h + self.attn(h.transpose(1, 2), cond.transpose(1, 2)).transpose(1, 2)
            if self.cond_skip:
                h = h + cond
        if self.dense is not None:
            h = F.silu(self.norm(h + self.dense(emb).unsqueeze(-1)))
        return h, cond


class ScoreNet(nn.Module):
    """Conditional time-dependent score model ``s(x, t, c)`` of IMDer (Wang et al., NeurIPS 2023; github.com/mdswyz/IMDer).

    Parameters
    ----------
    channels : int
        Feature channels of ``x`` and of the output (32 in IMDer).
    length : int, optional
        Expected sequence length (48 in IMDer); checked in ``forward`` when given. None accepts any length >= 1.
    cond_channels : int
        Channels of the condition (32). When it differs from ``widths[0]`` a 1x1 convolution maps it there (the
        authors' net has ``cond_channels == widths[0] == 32`` and no such layer).
    widths : sequence of int
        Per-level widths, (32, 64, 128, 256): one encoder level each, the first at full length, each further one
        halving it. At least two.
    embed_dim, fourier_scale : int, float
        Time embedding size (256) and the Fourier feature scale (30).
    num_heads, num_layers : int
        Cross-attention heads (8) and layers (2) at every level.
    groups_first, groups : int
        GroupNorm groups at the first level (4) and elsewhere (32), lowered to ``gcd(groups, width)``.
    sigma : float
        The VE SDE's sigma (25); the output is divided by ``std(t)``.
    attn_mask : bool
        Causal cross-attention (True, as the authors).
    cond_skip : bool
        Also add the condition path's features to ``h`` at every level (False: the authors' net, where the
        condition enters only through the causal cross-attention, which has to learn to attend step to step; on the
        embedded data that path learned slowly, see ``benchmarks/results/imder_recovery-*.md``).

    ``forward(x [B, C, L], t [B] or scalar, cond [B, Cc, L] or None) -> [B, C, L]``; with ``cond=None`` the
    cross-attention is skipped (an unconditional score model).
    """

    def __init__(
        self,
        channels: int = 32,
        length: int | None = None,
        cond_channels: int = 32,
        *,
        widths: Sequence[int] = (32, 64, 128, 256),
        embed_dim: int = 256,
        fourier_scale: float = 30.0,
        num_heads: int = 8,
        num_layers: int = 2,
        groups_first: int = 4,
        groups: int = 32,
        sigma: float = 25.0,
        attn_mask: bool = True,
        cond_skip: bool = False,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"ScoreNet: widths must hold at least two positive sizes, got {widths}")
        if channels < 1 or cond_channels < 1:
            raise ValueError(f"ScoreNet: channels and cond_channels must be >= 1, got {channels}, {cond_channels}")
        if length is not None and length < 1:
            raise ValueError(f"ScoreNet: length must be >= 1 or None, got {length}")
        if sigma <= 1.0:
            raise ValueError(f"ScoreNet: sigma must be > 1 for the VE SDE, got {sigma}")
        self.channels, self.cond_channels, self.length = int(channels), int(cond_channels), length
        self.widths = widths
        self.sigma = float(sigma)
        self.time_embed = nn.Sequential(GaussianFourierProjection(embed_dim, fourier_scale),
                                        nn.Linear(embed_dim, embed_dim))
        kw = dict(num_heads=num_heads, num_layers=num_layers, attn_mask=attn_mask, cond_skip=bool(cond_skip))

        def down(cin: int, cout: int, stride: int) -> nn.Conv1d:
            return nn.Conv1d(cin, cout, 3, stride=stride, padding=1, bias=False)

        def up(cin: int, cout: int, stride: int = 2, bias: bool = False) -> nn.ConvTranspose1d:
            return nn.ConvTranspose1d(cin, cout, 3, stride=stride, padding=1, output_padding=stride - 1, bias=bias)

        cond_in = (nn.Identity() if self.cond_channels == widths[0]
                   else nn.Conv1d(self.cond_channels, widths[0], 1, bias=False))
        self.down = nn.ModuleList([_Level(down(self.channels, widths[0], 1), cond_in, widths[0], embed_dim,
                                          groups=groups_first, **kw)])
        for i in range(1, len(widths)):
            self.down.append(_Level(down(widths[i - 1], widths[i], 2), down(widths[i - 1], widths[i], 2),
                                    widths[i], embed_dim, groups=groups, **kw))
        # Decoder, deepest first: the deepest level has no skip, the others take [h, encoder output] (2x channels).
        n = len(widths)
        self.up = nn.ModuleList()
        for i in range(n - 1, 0, -1):
            cin = widths[i] if i == n - 1 else 2 * widths[i]
            self.up.append(_Level(up(cin, widths[i - 1]), up(widths[i], widths[i - 1]), widths[i - 1], embed_dim,
                                  groups=groups, **kw))
        self.out = _Level(up(2 * widths[0], self.channels, stride=1, bias=True),
                          up(widths[0], self.channels, stride=1, bias=True), self.channels, embed_dim,
                          groups=None, **kw)

    def marginal_std(self, t: Tensor) -> Tensor:
        """``std(t)`` of the VE SDE's perturbation kernel."""
        return ve_marginal_std(t, self.sigma)

    def forward(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> Tensor:
        if x.dim() != 3 or x.shape[1] != self.channels:
            raise ValueError(f"ScoreNet: x must be [B, {self.channels}, L], got {tuple(x.shape)}")
        b, _, length = x.shape
        if self.length is not None and length != self.length:
            raise ValueError(f"ScoreNet: x has length {length}, the net was built for length {self.length}")
        if cond is not None and (cond.dim() != 3 or cond.shape != (b, self.cond_channels, length)):
            raise ValueError(f"ScoreNet: cond must be [{b}, {self.cond_channels}, {length}], got "
                             f"{tuple(cond.shape)}")
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"ScoreNet: t must be a scalar or [{b}], got {tuple(t.shape)}")
        emb = F.silu(self.time_embed(t))
        skips, lengths = [], []
        h, c = x, cond
        for i, level in enumerate(self.down):
            target = length if i == 0 else (lengths[-1] + 1) // 2
            h, c = level(h, c, emb, target)
            skips.append(h)
            lengths.append(target)
        for j, level in enumerate(self.up):
            skip_idx = len(skips) - 2 - j
            if j > 0:
                h = torch.cat([h, skips[skip_idx + 1]], dim=1)
            h, c = level(h, c, emb, lengths[skip_idx])
        h, _ = self.out(torch.cat([h, skips[0]], dim=1), c, emb, length)
        return h / self.marginal_std(t).view(b, 1, 1)


#: How :func:`dsm_loss` perturbs the condition: the authors' shared noise, independent noise, or not at all
#: (the same modes the samplers take, :data:`mmer_ext.sampling.CONDITION_MODES`).
CONDITION_NOISE = CONDITION_MODES


def dsm_loss(
    score_net: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    x: Tensor,
    cond: Tensor | None,
    sigma: float = 25.0,
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
    condition_noise: str = "shared",
) -> Tensor:
    """Denoising score matching loss of IMDer (github.com/mdswyz/IMDer), a 0-d tensor.

    Per sample ``t ~ U(eps, 1)`` and one ``z ~ N(0, I)`` of ``x``'s shape; ``x_t = x + std(t) z``; the loss is
    ``mean_b sum_{c,l} (s(x_t, t, c_t) std(t) + z)^2``. ``t`` and the noise come from ``generator`` (on ``x``'s
    device) or the default generator. Gradients reach the net's parameters and ``cond`` (IMDer's trainable
    two-modality fusion), not ``x`` unless it requires them.

    ``condition_noise`` says how the condition is perturbed (sample with the same mode: the samplers'
    ``condition_noise=``):

    * ``"shared"`` (default, the authors'): with the **same** ``z``, ``c_t = c + std(t) z``. Then ``c_t - x_t = c - x``
      for every ``t``, and the samplers (which re-noise the condition with fresh noise, as the authors' sampler does)
      feed the net condition/sample pairs it never saw in training. Worse, the loss's optimum uses the condition with
      the wrong sign: for scalar zero-mean jointly Gaussian ``x``, ``c`` (variances ``a``, ``b``, covariance ``r``),
      ``E[z | x_t, c_t] = std (( b - r) x_t + (a - r) c_t) / det`` with
      ``det = (a + std^2)(b + std^2) - (r + std^2)^2``, so the optimal score is ``-((b - r) x_t + (a - r) c_t) / det``
      and a larger condition pulls ``x`` *down* when ``r > 0``; the exact conditional score
      ``-(x_t - r c / b) / (a - r^2 / b + std^2)`` pulls it up. Kept to reproduce the authors.
    * ``"independent"``: with its own ``z'``, ``c_t = c + std(t) z'``: the pairs the re-noising samplers produce, so
      the net learns the score of ``p(x_t | c_t)``, which blurs the condition by the noise at ``t``.
    * ``"clean"``: ``c_t = c``, never perturbed (the standard conditional diffusion): the net learns the score of
      ``p(x_t | c)``; sample with ``condition_noise="clean"`` so it sees the condition as in training.
    """
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"dsm_loss: x must be a non-empty batch [B, ...], got {tuple(x.shape)}")
    if cond is not None and cond.shape != x.shape:
        raise ValueError(f"dsm_loss: cond must have x's shape {tuple(x.shape)} (it may share x's noise), got "
                         f"{tuple(cond.shape)}")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"dsm_loss: eps must be in (0, 1), got {eps}")
    if condition_noise not in CONDITION_NOISE:
        raise ValueError(f"dsm_loss: condition_noise must be one of {CONDITION_NOISE}, got {condition_noise!r}")
    b = x.shape[0]
    t = torch.rand(b, device=x.device, dtype=x.dtype, generator=generator) * (1.0 - eps) + eps
    z = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    x_t = ve_perturb(x, t, sigma, noise=z)
    if cond is None:
        c_t = None
    elif condition_noise == "clean":
        c_t = cond
    elif condition_noise == "shared":
        c_t = ve_perturb(cond, t, sigma, noise=z)
    else:
        c_t = ve_perturb(cond, t, sigma, noise=torch.randn(x.shape, device=x.device, dtype=x.dtype,
                                                             generator=generator))
    score = score_net(x_t, t, c_t)
    std = ve_marginal_std(t, sigma).view(b, *([1] * (x.dim() - 1)))
    return (score * std + z).pow(2).flatten(1).sum(dim=1).mean()


class FrameScoreNet(nn.Module):
    """A per-frame conditional score model ``s(x, t, c)`` for ``x`` ``[B, C, L]``: a residual MLP applied at every
    step, reading that step's noisy features, a centred window of the condition's steps and the time embedding.

    Why (``benchmarks/results/imder_recovery-*.md``, issue 11): on the embedded MOSI-like data each frame of a
    missing modality is a noisy view of a trajectory shared with the other modalities' frames *at the same time*, so
    the conditional that matters is per frame (what the windowed ridge regressor reads too). The sequence U-Net
    (:class:`ScoreNet`) has to learn a score over ``C x L`` dimensions from a few hundred sequences and stayed at
    a recovery correlation of ~0.09 where a posterior sample has ~0.3; this net sees every frame as a training
    example (``L`` times as many) in ``C`` dimensions and reaches the posterior's correlation in a few hundred steps.
    Frames are sampled independently given the condition: the condition window carries the predictable time
    structure, but what the condition cannot predict (on the embedded data a private offset per sequence, constant
    in time) is redrawn at every step, so samples match the real frames' distribution, not the real sequences'
    temporal coherence (see the demo's heatmaps).

    The noisy input is scaled by ``1 / sqrt(1 + std(t)^2)`` (unit-variance data stays O(1) at every noise level,
    EDM's ``c_in``) and, as :class:`ScoreNet`, the output is divided by ``std(t)``.

    Parameters
    ----------
    channels, cond_channels : int
        Feature channels of ``x`` (and the output) and of the condition.
    hidden : int
        Width of the MLP (256).
    depth : int
        Residual blocks (3), each ``h + Linear(silu(LayerNorm(h)))`` with the time embedding added before it.
    cond_window : int
        Condition steps read per frame, odd (5, centred; the ends are replicated).
    embed_dim, fourier_scale : int, float
        Time embedding size (64) and Fourier feature scale (16).
    sigma : float
        The VE SDE's sigma.
    """

    def __init__(self, channels: int = 32, cond_channels: int = 32, *, hidden: int = 256, depth: int = 3,
                 cond_window: int = 5, embed_dim: int = 64, fourier_scale: float = 16.0,
                 sigma: float = 25.0) -> None:
        super().__init__()
        if channels < 1 or cond_channels < 1:
            raise ValueError(f"FrameScoreNet: channels and cond_channels must be >= 1, got {channels}, "
                             f"{cond_channels}")
        if hidden < 1 or depth < 0:
            raise ValueError(f"FrameScoreNet: hidden must be >= 1 and depth >= 0, got {hidden}, {depth}")
        if cond_window < 1 or cond_window % 2 == 0:
            raise ValueError(f"FrameScoreNet: cond_window must be odd and >= 1, got {cond_window}")
        if sigma <= 1.0:
            raise ValueError(f"FrameScoreNet: sigma must be > 1 for the VE SDE, got {sigma}")
        self.channels, self.cond_channels, self.cond_window = int(channels), int(cond_channels), int(cond_window)
        self.sigma = float(sigma)
        self.time_embed = nn.Sequential(GaussianFourierProjection(embed_dim, fourier_scale),
                                        nn.Linear(embed_dim, embed_dim), nn.SiLU())
        self.x_in = nn.Conv1d(self.channels, hidden, 1)
        self.c_in = nn.Conv1d(self.cond_channels, hidden, self.cond_window, bias=False)
        self.blocks = nn.ModuleList(nn.ModuleDict({"t": nn.Linear(embed_dim, hidden), "norm": nn.LayerNorm(hidden),
                                                   "lin": nn.Linear(hidden, hidden)}) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, self.channels)

    def marginal_std(self, t: Tensor) -> Tensor:
        """``std(t)`` of the VE SDE's perturbation kernel."""
        return ve_marginal_std(t, self.sigma)

    def forward(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> Tensor:
        if x.dim() != 3 or x.shape[1] != self.channels:
            raise ValueError(f"FrameScoreNet: x must be [B, {self.channels}, L], got {tuple(x.shape)}")
        b, _, length = x.shape
        if cond is not None and (cond.dim() != 3 or cond.shape != (b, self.cond_channels, length)):
            raise ValueError(f"FrameScoreNet: cond must be [{b}, {self.cond_channels}, {length}], got "
                             f"{tuple(cond.shape)}")
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"FrameScoreNet: t must be a scalar or [{b}], got {tuple(t.shape)}")
        std = self.marginal_std(t).view(b, 1, 1)
        h = self.x_in(x * torch.rsqrt(1.0 + std * std))
        if cond is not None:
            half = self.cond_window // 2
            h = h + self.c_in(F.pad(cond, (half, half), mode="replicate") if half else cond)
        h = h.transpose(1, 2)  # [B, L, H]
        emb = self.time_embed(t).unsqueeze(1)
        for blk in self.blocks:
            h = h + blk["lin"](F.silu(blk["norm"](h + blk["t"](emb))))
        return self.out(F.silu(self.out_norm(h))).transpose(1, 2) / std
