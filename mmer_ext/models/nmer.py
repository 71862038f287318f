"""NMER (MRAC @ ACM MM 2023, arXiv 2311.16114): noise-robust emotion recognition with a conditional VAE; github.com/WooyoohL/Noise-robust_MER.

Two stages, as the authors train them:

1. :class:`NMERTeacher` (the authors' ``utt_shared_002``) on full, clean data: per modality an *invariant* and a
   *specific* encoder, the IF-MMIN :class:`~mmer_ext.models.encoders.SharedEncoder` on the invariant embeddings,
   classifier on ``[spec || shared]`` and loss ``CE + CMD``.
2. :class:`NMER` on noisy data: the missing modalities are not zeroed but noised by the diffusion-style
   ``NoiseScheduler`` of :func:`mmer_ext.data.corrupt_batch` (``mode="gaussian"`` / ``"impulse"``). That happens in
   the data pipeline, *not* here: the model reads ``batch["A"/"V"/"L"]`` as given and the clean ``"*_clean"``
   features for its targets. A :class:`ConditionVAE` maps the noisy specific features, conditioned on the
   invariant ones, to an estimate of the teacher's clean specific features, and the classifier reads that estimate.

The paper's CVAE is restored from the authors' two commits (HEAD lost the ``Decoder`` class); see
:class:`ConditionVAE` for the batch-mixing bug of the authors' encoder and what we do instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mmer_ext.models.base import MERModel, trainable_copy
from mmer_ext.models.encoders import (
    FUSION_ORDER,
    FcClassifier,
    ModalityEncoders,
    SharedEncoder,
    fuse,
    kaiming_init_,
)
from mmer_ext.models.invariance import normalize_for_cmd
from mmer_ext.ops import cmd_pairwise

__all__ = ["ConditionVAE", "NMER", "NMERTeacher", "gaussian_kl"]

_KL_REDUCTIONS = ("sum", "mean", "none")
_DECODER_ACTIVATIONS = ("sigmoid", "none")


def gaussian_kl(mu: Tensor, logvar: Tensor, reduction: str = "sum") -> Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))`` of a diagonal Gaussian posterior.

    Per sample ``-0.5 * sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j))``.

    Parameters
    ----------
    mu, logvar : Tensor
        ``[B, latent]``.
    reduction : {"sum", "mean", "none"}
        ``"sum"``: summed over the latent dimensions *and the batch* (the authors' ``torch.sum``); ``"mean"``:
        summed over the latent dimensions, averaged over the batch (the per-sample ELBO term, independent of the
        batch size); ``"none"``: ``[B]`` per-sample values.
    """
    if reduction not in _KL_REDUCTIONS:
        raise ValueError(f"gaussian_kl: reduction must be one of {_KL_REDUCTIONS}, got {reduction!r}")
    per_sample = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=-1)
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    return per_sample


def _shared_features(shared: nn.Module, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {m: shared(x) for m, x in feats.items()}


class _DenoisingHead(nn.Module):
    """Per-sample stand-in for the authors' diffusers UNet term of the teacher (off by default, see NMERTeacher).

    A DDPM epsilon-prediction objective on the fused specific features ``x0`` ``[B, 384]``, conditioned on the fused
    shared features ``S`` ``[B, 384]``: ``t ~ U{0..T-1}`` and ``eps ~ N(0, I)`` per sample,
    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` and an MLP on ``[x_t || S || emb(t)]`` predicts ``eps``. The
    schedule is the authors' ``DDPMScheduler(0.00085, 0.012, "scaled_linear", 1000)``: betas linear in sqrt space,
    squared. Gradients reach ``x0`` and ``S``, so the term regularises the teacher's features as the UNet term does.
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        hidden: int = 256,
        num_steps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        time_dim: int = 32,
    ) -> None:
        super().__init__()
        self.num_steps = int(num_steps)
        self.time_dim = int(time_dim)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, self.num_steps, dtype=torch.float64) ** 2
        abar = torch.cumprod(1.0 - betas, dim=0)
        # Not persistent: derived from the hyper-parameters, so a checkpoint does not depend on them.
        self.register_buffer("alphas_cumprod", abar.float(), persistent=False)
        self.net = nn.Sequential(
            nn.Linear(dim + cond_dim + self.time_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, dim),
        )

    def time_embedding(self, t: Tensor) -> Tensor:
        half = self.time_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = t.float().unsqueeze(1) * freqs.unsqueeze(0)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    def forward(self, x0: Tensor, cond: Tensor) -> Tensor:
        """The denoising MSE (0-d) for one batch; stochastic (torch's global RNG)."""
        b = x0.shape[0]
        t = torch.randint(0, self.num_steps, (b,), device=x0.device)
        eps = torch.randn_like(x0)
        abar = self.alphas_cumprod.to(x0.dtype)[t].unsqueeze(1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        pred = self.net(torch.cat([x_t, cond, self.time_embedding(t).to(x0.dtype)], dim=1))
        return F.mse_loss(pred, eps)


class NMERTeacher(MERModel):
    """NMER's stage-1 teacher (the authors' ``utt_shared_002``), trained on full clean data.

    Per modality two encoders of the MMIN kind (A/V LSTM, L TextCNN), one for *invariant* and one for *specific*
    features; the shared projection ``s_m = Shared(inv_m)``; a classifier on ``[spec_a, spec_l, spec_v, s_a, s_l,
    s_v]`` (768 -> 128 -> 128 -> C, dropout 0.2)::

        loss = CE + cmd_weight * cmd_pairwise([s_a, s_l, s_v], K=5) [+ recon_weight * denoising MSE]

    Parameters
    ----------
    dims : ModalityDims or (A, V, L)
        Input feature sizes.
    num_classes : int
        C.
    teacher : None
        Accepted for the common constructor signature; unused.
    hidden, cls_layers, dropout, text_dropout, embd_method_a, embd_method_v, use_lengths :
        128, (128, 128), 0.2 (script ``fix/CAP_utt_shared_002.sh``), 0.5, "maxpool", "maxpool", True.
    cmd_weight : float
        1.0.
    n_moments : int
        K = 5.
    recon_weight : float
        Weight of the optional per-sample denoising term (:class:`_DenoisingHead`); 0.0 (default) builds no head.
    recon_hidden : int
        Width of that head's MLP (256).
    cmd_normalize : {"none", "l2", "pooled"}
        What the CMD sees (:mod:`mmer_ext.models.invariance`): "none" (default) the authors' raw shared features;
        "l2" / "pooled" scale-invariant inputs, so the CMD cannot be lowered by shrinking the features.

    Notes
    -----
    The authors add ``100 * MSE`` of a diffusers ``UNet2DConditionModel`` that reads the fused specific features
    (noised by a DDPM step), conditioned on the shared ones. Their prediction is ``UNet(x_t) + x`` and the target is
    ``x`` itself, so the residual cancels the target and the term is ``100 * mean(UNet(x_t)^2)``: it pushes the
    UNet's output towards zero (and, through ``x_t`` and the condition, shrinks what it reads) rather than training a
    denoiser. We leave it out by default and do not depend on ``diffusers``:

    * it only regularises the teacher's *specific* features (the classifier, the CMD and everything the student
      copies work without it);
    * it reshapes the whole ``[64, 384]`` batch into one ``(1, 4, 64, 96)`` "image", so it needs a batch of exactly
      64 (the last partial batch of an epoch breaks the run) and, like the CVAE bug below, mixes samples through its
      convolutions.

    ``recon_weight > 0`` adds a per-sample denoising objective (DDPM epsilon prediction with the same
    ``scaled_linear(0.00085, 0.012, 1000)`` schedule, MLP instead of UNet) that works for any batch size. It is *not*
    equivalent to the authors' term (theirs has no denoising target, see above).
    The authors' code gives no gradient clip for the teacher; like ``utt_shared`` it inherits ``utt_fusion``'s 0.5 (the
    authors' ``utt_shared_002`` clips at 0.5 too).
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
        dropout: float = 0.2,
        text_dropout: float = 0.5,
        embd_method_a: str = "maxpool",
        embd_method_v: str = "maxpool",
        use_lengths: bool = True,
        cmd_weight: float = 1.0,
        n_moments: int = 5,
        recon_weight: float = 0.0,
        recon_hidden: int = 256,
        cmd_normalize: str = "none",
    ) -> None:
        super().__init__()
        del teacher
        self.num_classes = int(num_classes)
        self.cmd_weight = float(cmd_weight)
        self.n_moments = int(n_moments)
        normalize_for_cmd([], cmd_normalize)  # validates the name
        self.cmd_normalize = cmd_normalize
        self.recon_weight = float(recon_weight)
        enc_kw = dict(
            embd_method_a=embd_method_a,
            embd_method_v=embd_method_v,
            text_dropout=text_dropout,
            use_lengths=use_lengths,
        )
        self.inv_encoders = ModalityEncoders(dims, hidden, **enc_kw)
        self.spec_encoders = ModalityEncoders(dims, hidden, **enc_kw)
        self.shared = SharedEncoder(hidden)
        fused = self.spec_encoders.fused_dim
        self.classifier = FcClassifier(2 * fused, cls_layers, self.num_classes, dropout=dropout)
        self.denoiser = _DenoisingHead(fused, fused, recon_hidden) if self.recon_weight > 0 else None
        kaiming_init_(self)

    @property
    def fused_dim(self) -> int:
        return self.spec_encoders.fused_dim

    def encode(self, A: Tensor, V: Tensor, L: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(spec [B, 384], shared [B, 384])`` of explicit inputs, both fused in ``[a, l, v]`` order."""
        spec = self.spec_encoders(A, V, L, lengths)
        shared = _shared_features(self.shared, self.inv_encoders(A, V, L, lengths))
        return fuse(spec), fuse(shared)

    def features(self, batch: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(specific, shared)`` per-modality features ``{A, V, L: [B, hidden]}`` of the input as given."""
        x, lengths = self.inputs(batch), self.lengths(batch)
        spec = self.spec_encoders(*x, lengths)
        return spec, _shared_features(self.shared, self.inv_encoders(*x, lengths))

    def _logits(self, spec: Mapping[str, Tensor], shared: Mapping[str, Tensor]) -> Tensor:
        return self.classifier(torch.cat([fuse(spec), fuse(shared)], dim=-1))

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        return self._logits(*self.features(batch))

    def cmd_loss(self, shared: Mapping[str, Tensor]) -> Tensor:
        """Mean CMD (K = ``n_moments``) over the three pairs of shared features."""
        return cmd_pairwise(normalize_for_cmd([shared[m] for m in FUSION_ORDER], self.cmd_normalize), self.n_moments)

    def training_loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``(CE + cmd_weight * CMD [+ recon_weight * recon], {"ce", "cmd"[, "recon"]})``; parts unweighted."""
        spec, shared = self.features(batch)
        ce = F.cross_entropy(self._logits(spec, shared), batch["label"])
        cmd = self.cmd_loss(shared)
        loss = ce + self.cmd_weight * cmd
        parts = {"ce": ce.detach(), "cmd": cmd.detach()}
        if self.denoiser is not None:
            recon = self.denoiser(fuse(spec), fuse(shared))
            loss = loss + self.recon_weight * recon
            parts["recon"] = recon.detach()
        return loss, parts


class ConditionVAE(nn.Module):
    """NMER's conditional VAE: noisy specific features ``f`` (384), conditioned on invariant features ``S`` (384), ->
    estimate of the clean specific features.

    ::

        h          = TransformerEncoder([f || S])              # d_model 768, 8 heads, ff 128, 5 layers, dropout 0.1
        mu, logvar = Linear(768 -> 64)(h), Linear(768 -> 64)(h)
        z          = mu + eps * exp(logvar / 2)   (training)     z = mu   (eval)
        x_recon    = sigmoid(Lin(128 -> 384)(LeakyReLU(Lin(64 + 384 -> 128)([z || S]))))

    Parameters
    ----------
    input_dim, cond_dim : int
        384 and 384.
    latent_dim : int
        64.
    hidden_dim : int
        Feed-forward width of the transformer layers and hidden width of the decoder (128).
    num_layers, nhead, encoder_dropout : int, int, float
        5, 8, 0.1 (``nn.TransformerEncoderLayer``'s defaults, as the authors leave them: post-norm, ReLU).
    attend_across_batch : bool
        False (default): every sample is encoded on its own, as a length-1 sequence. True reproduces the authors'
        call (see Notes); only for comparison.
    decoder_activation : {"sigmoid", "none"}
        Output non-linearity of the decoder. "sigmoid" (default) is the authors'.
    sample_at_eval : bool
        False (default): ``z = mu`` in eval mode, so inference is deterministic. True samples in eval as the authors'
        code does (it always reparameterises).

    Notes
    -----
    *Batch mixing (authors' bug).* The authors feed the 2-D ``[B, 768]`` tensor to ``nn.TransformerEncoder``, which
    PyTorch reads as ONE unbatched sequence of length ``B``: self-attention then mixes the samples of a batch, so a
    sample's prediction depends on which other utterances share its batch (and on the batch size, and differs
    between training and test batching). The paper describes a per-sample encoder, so by default we give each sample
    its own length-1 sequence (``[B, 1, 768]``, batch first). Attention over a single token is the identity on the
    values, so each layer then acts as ``LayerNorm(x + W_o W_v x)`` followed by the feed-forward block: an MLP with
    residuals and layer norms. The parameters are the same in both modes, so a state dict loads into either.

    *Output range.* The target is the teacher's fused specific features on the clean input,
    ``[a, l, v]``: ``a`` and ``v`` are max-pooled LSTM outputs in ``(-1, 1)`` and ``l`` is a ReLU output in
    ``[0, inf)``. A sigmoid decoder cannot reach the negative ``a``/``v`` entries nor ``l`` entries above 1, so the
    reconstruction MSE has a floor of ``mean((T - clip(T, 0, 1))^2)``. We keep the sigmoid by default because the
    classifier is trained on ``x_recon`` (a bounded input is what the published numbers were obtained with) and the
    reconstruction is only an auxiliary target; ``decoder_activation="none"`` removes the floor.

    *Dropped pieces.* The authors' module also builds an unused ``fc_out = Linear(64 + 384, 384)``; we omit it. HEAD
    references a ``Decoder`` class that only exists in commit ``cd20f9a`` (NameError at HEAD); we restore it from
    there (two linear layers, LeakyReLU with the default slope, sigmoid).
    """

    def __init__(
        self,
        input_dim: int = 384,
        cond_dim: int = 384,
        latent_dim: int = 64,
        hidden_dim: int = 128,
        num_layers: int = 5,
        nhead: int = 8,
        encoder_dropout: float = 0.1,
        *,
        attend_across_batch: bool = False,
        decoder_activation: str = "sigmoid",
        sample_at_eval: bool = False,
    ) -> None:
        super().__init__()
        if decoder_activation not in _DECODER_ACTIVATIONS:
            raise ValueError(
                f"ConditionVAE: decoder_activation must be one of {_DECODER_ACTIVATIONS}, got {decoder_activation!r}"
            )
        self.input_dim, self.cond_dim = int(input_dim), int(cond_dim)
        self.latent_dim, self.hidden_dim = int(latent_dim), int(hidden_dim)
        self.attend_across_batch = bool(attend_across_batch)
        self.decoder_activation = decoder_activation
        self.sample_at_eval = bool(sample_at_eval)
        d_model = self.input_dim + self.cond_dim
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward=self.hidden_dim, dropout=encoder_dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.fc_mu = nn.Linear(d_model, self.latent_dim)
        self.fc_logvar = nn.Linear(d_model, self.latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(self.latent_dim + self.cond_dim, self.hidden_dim),
            nn.LeakyReLU(),
            nn.Linear(self.hidden_dim, self.input_dim),
        )

    def encode(self, f: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, logvar)`` ``[B, latent]`` of ``f`` ``[B, input_dim]`` given ``cond`` ``[B, cond_dim]``."""
        x = torch.cat([f, cond], dim=-1)
        if self.attend_across_batch:
            h = self.encoder(x)  # 2-D: one unbatched sequence of length B (the authors' behaviour)
        else:
            h = self.encoder(x.unsqueeze(1)).squeeze(1)  # B sequences of length 1
        return self.fc_mu(h), self.fc_logvar(h)

    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        """``mu + eps * sigma`` (``eps = torch.randn``) in training (or with ``sample_at_eval``), else ``mu``."""
        if self.training or self.sample_at_eval:
            return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return mu

    def decode(self, z: Tensor, cond: Tensor) -> Tensor:
        out = self.decoder(torch.cat([z, cond], dim=-1))
        return torch.sigmoid(out) if self.decoder_activation == "sigmoid" else out

    def forward(self, f: Tensor, cond: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_recon [B, input_dim], mu [B, latent], logvar [B, latent])``."""
        mu, logvar = self.encode(f, cond)
        return self.decode(self.reparameterize(mu, logvar), cond), mu, logvar


class NMER(MERModel):
    """Noise-robust Multimodal Emotion Recognition (stage 2 of NMER).

    Student invariant/specific encoders and shared projection start as trainable deep copies of the teacher's
    (:class:`NMERTeacher`), which stays frozen in eval mode. On the noisy input (missing modalities noised by the
    data pipeline)::

        f = [spec_a, spec_l, spec_v]                 S = [Shared(inv_a), Shared(inv_l), Shared(inv_v)]   (384 each)
        x_recon, mu, logvar = ConditionVAE(f, S)     # [B, 384], [B, 64], [B, 64]
        logits = FcClassifier(384 -> 128 -> 128 -> C, BatchNorm, dropout 0.1)(x_recon)

    Loss::

        ce_weight * CE + invariant_weight * MSE(S, S_teacher(clean))
            + recon_weight * MSE(x_recon, T_spec(clean)) + kl_weight * KL

    where ``T_spec(clean)`` / ``S_teacher(clean)`` are the frozen teacher's fused specific / shared features of the
    clean input ``"*_clean"`` (no gradient), MSEs are means over all elements and ``KL = gaussian_kl(mu, logvar,
    kl_reduction)``.

    Parameters
    ----------
    dims : ModalityDims or (A, V, L)
        Input feature sizes.
    num_classes : int
        C.
    teacher : NMERTeacher, optional
        Trained stage-1 model, registered frozen as ``self.teacher`` (kept in the state dict, excluded from
        :meth:`trainable_parameters`). None builds a fresh ``NMERTeacher(dims, C, **teacher_hparams)``: only useful
        to load a saved NMER state dict into.
    teacher_hparams : dict, optional
        Constructor arguments of that fresh teacher.
    cls_layers, dropout, use_bn :
        (128, 128), 0.1, True.
    latent_dim, cvae_hidden, cvae_layers, cvae_heads, cvae_dropout :
        64, 128, 5, 8, 0.1 (see :class:`ConditionVAE`).
    attend_across_batch, decoder_activation, sample_at_eval :
        False, "sigmoid", False (see :class:`ConditionVAE`).
    ce_weight, invariant_weight, recon_weight, kl_weight : float
        1.0 each (the authors' loss).
    kl_reduction : {"mean", "sum"}
        "mean" (default): summed over latent dimensions, averaged over the batch — the per-sample ELBO term of the
        paper's CVAE. "sum" reproduces the authors' code, which also sums over the batch: a bug, since the KL's
        weight against the mean-reduced CE and MSE terms then grows with the batch size (x128 in the recipe). On the
        embedded data the summed KL dominates the loss (about 300 against CE 1.9 in the first epoch), and in an
        8-epoch run the student's validation UA stayed at chance (0.25) for the first 4 epochs, where "mean" had
        reached 0.32 (seed 0; ``mmer-ext train --model nmer --set hparams.student.kl_reduction=sum`` repeats it).
    cvae_init : {"default", "kaiming"}
        "default": the CVAE keeps PyTorch's own initialisation. "kaiming": the authors' ``init_net`` (kaiming-normal
        fan-in weights, zero biases on every ``Linear``, including the attention output projections; the
        attention in-projection and the layer norms keep PyTorch's init), which the authors apply to the whole VAE
        because their ``model_names`` lists ``VAE`` (issue 15's review measured the initial KL at 132 per sample
        with it, 15.9 without).

    Notes
    -----
    Deviations from the authors' code (each documented in :class:`ConditionVAE`), all switchable, and together the
    recipe ``nmer-authors``: per-sample CVAE encoder instead of attention across the batch
    (``attend_across_batch``), ``z = mu`` at evaluation (``sample_at_eval``; theirs samples, so their test
    predictions are random), the KL averaged over the batch (``kl_reduction``), PyTorch's default initialisation of
    the CVAE (``cvae_init``; the authors' ``setup`` runs ``init_net(kaiming)`` over every name in ``model_names``,
    which includes ``VAE``; only the classifier gets the family's kaiming init here, because kaiming-normal on
    ``fc_logvar`` starts ``exp(logvar)`` orders of magnitude from 1 and the per-sample KL near 1e2), and the
    padding frames of a noised modality stay zero (the data pipeline's ``noise_padding``; the authors noise the
    whole padded tensor). No hard-coded ``.cuda()``. Gradient clip 1.0.
    """

    clip_grad_norm = 1.0

    def __init__(
        self,
        dims,
        num_classes: int,
        *,
        teacher: NMERTeacher | None = None,
        teacher_hparams: Mapping | None = None,
        cls_layers: Sequence[int] = (128, 128),
        dropout: float = 0.1,
        use_bn: bool = True,
        latent_dim: int = 64,
        cvae_hidden: int = 128,
        cvae_layers: int = 5,
        cvae_heads: int = 8,
        cvae_dropout: float = 0.1,
        attend_across_batch: bool = False,
        decoder_activation: str = "sigmoid",
        sample_at_eval: bool = False,
        ce_weight: float = 1.0,
        invariant_weight: float = 1.0,
        recon_weight: float = 1.0,
        kl_weight: float = 1.0,
        kl_reduction: str = "mean",
        cvae_init: str = "default",
    ) -> None:
        super().__init__()
        if kl_reduction not in ("sum", "mean"):
            raise ValueError(f"NMER: kl_reduction must be 'sum' or 'mean', got {kl_reduction!r}")
        if cvae_init not in ("default", "kaiming"):
            raise ValueError(f"NMER: cvae_init must be 'default' or 'kaiming', got {cvae_init!r}")
        if teacher is None:
            teacher = NMERTeacher(dims, num_classes, **dict(teacher_hparams or {}))
        self.num_classes = int(num_classes)
        self.ce_weight, self.invariant_weight = float(ce_weight), float(invariant_weight)
        self.recon_weight, self.kl_weight = float(recon_weight), float(kl_weight)
        self.kl_reduction = kl_reduction
        self.inv_encoders = trainable_copy(teacher.inv_encoders)
        self.spec_encoders = trainable_copy(teacher.spec_encoders)
        self.shared = trainable_copy(teacher.shared)
        fused = self.spec_encoders.fused_dim
        self.cvae = ConditionVAE(
            fused,
            fused,
            latent_dim,
            cvae_hidden,
            cvae_layers,
            cvae_heads,
            cvae_dropout,
            attend_across_batch=attend_across_batch,
            decoder_activation=decoder_activation,
            sample_at_eval=sample_at_eval,
        )
        self.classifier = FcClassifier(fused, cls_layers, self.num_classes, dropout=dropout, use_bn=use_bn)
        # "default" leaves PyTorch's init on the CVAE (see cvae_init); "kaiming" is the authors' init_net over it.
        self.cvae_init = cvae_init
        if cvae_init == "kaiming":
            kaiming_init_(self.cvae)
        kaiming_init_(self.classifier)
        self.register_frozen("teacher", teacher)

    def _run(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        x, lengths = self.inputs(batch), self.lengths(batch)
        f = fuse(self.spec_encoders(*x, lengths))
        S = fuse(_shared_features(self.shared, self.inv_encoders(*x, lengths)))
        x_recon, mu, logvar = self.cvae(f, S)
        return {"f": f, "S": S, "x_recon": x_recon, "mu": mu, "logvar": logvar, "logits": self.classifier(x_recon)}

    @torch.no_grad()
    def targets(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(T_spec, S_teacher)``: the frozen teacher's fused specific and shared features of the clean input."""
        self.teacher.eval()
        return self.teacher.encode(*self.clean_inputs(batch), self.lengths(batch))

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        return self._run(batch)["logits"]

    def training_loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, {"ce", "invariant", "recon", "kl"})``; parts unweighted, ``kl`` reduced by ``kl_reduction``."""
        out = self._run(batch)
        t_spec, s_teacher = self.targets(batch)
        ce = F.cross_entropy(out["logits"], batch["label"])
        invariant = F.mse_loss(out["S"], s_teacher)
        recon = F.mse_loss(out["x_recon"], t_spec)
        kl = gaussian_kl(out["mu"], out["logvar"], self.kl_reduction)
        loss = (
            self.ce_weight * ce
            + self.invariant_weight * invariant
            + self.recon_weight * recon
            + self.kl_weight * kl
        )
        parts = {"ce": ce.detach(), "invariant": invariant.detach(), "recon": recon.detach(), "kl": kl.detach()}
        return loss, parts

    @torch.no_grad()
    def embeddings(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{"imagined": x_recon [B, 384], "target": T_spec(clean) [B, 384]}`` (no grad; for the t-SNE figure)."""
        return {"imagined": self._run(batch)["x_recon"], "target": self.targets(batch)[0]}
