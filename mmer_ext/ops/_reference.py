"""Pure-PyTorch references of every mmer_ext op: test oracles and benchmark baselines.

They favour clarity over speed and define the intended semantics, including edge cases (the zero-norm
subgradient of CMD is 0 because ``torch.linalg.vector_norm`` defines it so).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

import torch
from torch import Tensor


def central_moments_ref(x: Tensor, n_moments: int) -> Tensor:
    """``[n_moments, D]``: row 0 the mean over the batch, row k-1 the central moment E[(x - mean)^k]."""
    mean = x.mean(0)
    centred = x - mean
    rows = [mean] + [centred.pow(k).mean(0) for k in range(2, n_moments + 1)]
    return torch.stack(rows)


def cmd_ref(x1: Tensor, x2: Tensor, n_moments: int = 5) -> Tensor:
    """||mean(x1) - mean(x2)||_2 + sum_{k=2..K} ||c_k(x1) - c_k(x2)||_2 (no range normalisation)."""
    m1, m2 = central_moments_ref(x1, n_moments), central_moments_ref(x2, n_moments)
    return torch.linalg.vector_norm(m1 - m2, dim=1).sum()


def cmd_pairwise_ref(xs: Tensor | Sequence[Tensor], n_moments: int = 5) -> Tensor:
    """Mean of :func:`cmd_ref` over all unordered pairs of ``xs``."""
    xs = list(xs.unbind(0)) if isinstance(xs, Tensor) else list(xs)
    losses = [cmd_ref(a, b, n_moments) for a, b in combinations(xs, 2)]
    return torch.stack(losses).mean()


def cmd_ifmmin_style(x1: Tensor, x2: Tensor, n_moments: int = 5) -> Tensor:
    """CMD computed the way the IF-MMIN / MISA code does it (a ``CMD`` module with ``matchnorm`` and ``scm``):
    the benchmark baseline of what users run today. Its gradient is NaN when two moments match exactly,
    because the norm is ``sum(...) ** 0.5``."""

    def matchnorm(a: Tensor, b: Tensor) -> Tensor:
        return torch.sum(torch.pow(a - b, 2)) ** 0.5

    def scm(sx1: Tensor, sx2: Tensor, k: int) -> Tensor:
        return matchnorm(torch.mean(torch.pow(sx1, k), 0), torch.mean(torch.pow(sx2, k), 0))

    mx1, mx2 = torch.mean(x1, 0), torch.mean(x2, 0)
    sx1, sx2 = x1 - mx1, x2 - mx2
    loss = matchnorm(mx1, mx2)
    for i in range(n_moments - 1):
        loss = loss + scm(sx1, sx2, i + 2)
    return loss


def cmd_pairwise_ifmmin_style(xs: Sequence[Tensor], n_moments: int = 5) -> Tensor:
    """IF-MMIN's invariant loss: the CMD of the (l, v), (l, a), (a, v) pairs, averaged; for M inputs, every pair."""
    xs = list(xs)
    loss = 0.0
    pairs = list(combinations(range(len(xs)), 2))
    for i, j in pairs:
        loss = loss + cmd_ifmmin_style(xs[i], xs[j], n_moments)
    return loss / len(pairs)


# ---- dialogue graphs (MMGCN) --------------------------------------------------------------------------------------
#
# Node order of the graph over a batch of dialogues: ``features`` is ``[M, N, D]`` (M modalities of the same N
# utterances, the dialogues concatenated in order, ``lengths[g]`` utterances each), and node ``m * N + k`` is
# utterance ``k`` in modality ``m`` (modality-major, MMGCN's order). The padded block of dialogue ``g`` has
# ``M * Lmax`` slots, slot ``m * Lmax + i`` holding utterance ``i`` of the dialogue in modality ``m``.


def _dialogue_slots(lengths: Tensor, num_modalities: int, num_utterances: int) -> tuple[Tensor, Tensor, Tensor]:
    """Index maps between the global node order and the padded per-dialogue slots.

    Returns ``(node_of_slot [G, M * Lmax], valid [G, M * Lmax], slot_of_node [M * N])``: ``node_of_slot`` is the
    global node held by each slot (0 for padding, which ``valid`` marks False) and ``slot_of_node`` the flat
    index ``g * M * Lmax + slot`` of each node.
    """
    M, N = num_modalities, num_utterances
    lengths = lengths.to(torch.int64)
    G = lengths.numel()
    l_max = int(lengths.max()) if G > 0 else 0
    offsets = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(l_max, device=lengths.device)
    valid = (pos[None, :] < lengths[:, None]).unsqueeze(1).expand(G, M, l_max)  # [G, M, Lmax]
    utterance = offsets[:, None] + pos[None, :]  # [G, Lmax]
    modality = torch.arange(M, device=lengths.device)
    node = modality[None, :, None] * N + utterance[:, None, :]  # [G, M, Lmax]
    node = torch.where(valid, node, 0)
    slot = torch.arange(G * M * l_max, device=lengths.device).reshape(G, M, l_max)
    slot_of_node = torch.empty(M * N, dtype=torch.int64, device=lengths.device)
    slot_of_node[node[valid]] = slot[valid]
    return node.reshape(G, M * l_max), valid.reshape(G, M * l_max), slot_of_node


def _unit_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x / ||x||, ||x|| > 0)`` over the last dim, with zero rows mapped to zero (gradient 0 there, no NaN).

    Each row is divided by its largest magnitude first, so the norm neither overflows nor underflows (float32 rows
    of 1e-30 or 1e30 give the unit vectors of rows of 1). The divisor is detached: ``x / c`` has the same unit vector
    and, for a constant ``c``, the same gradient of it."""
    if x.shape[-1] > 0:
        max_abs = x.detach().abs().amax(dim=-1, keepdim=True)
        x = x / torch.where(max_abs > 0, max_abs, torch.ones_like(max_abs))
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    nonzero = norm != 0  # a NaN norm (NaN or Inf features) is not a zero vector: NaN propagates
    unit = torch.where(nonzero, x / torch.where(nonzero, norm, torch.ones_like(norm)), torch.zeros_like(x))
    return unit, nonzero.squeeze(-1)


def _angular_weight(cos: Tensor, scale: float) -> Tensor:
    """MMGCN's edge weight ``1 - arccos(scale * cos) / pi`` (the clamp only absorbs rounding when scale = 1)."""
    return 1.0 - torch.acos((scale * cos).clamp(-1.0, 1.0)) / math.pi


def angular_adjacency_ref(
    features: Tensor,
    lengths: Tensor,
    *,
    scale: float = 0.99999,
    normalize: bool = True,
    window: int | None = None,
    layout: str = "dense",
) -> Tensor:
    """Pure-PyTorch definition of :func:`mmer_ext.ops.angular_adjacency` (vectorised over padded dialogues).

    Edge weight ``1 - arccos(scale * cos(u, v)) / pi``; intra-modality edges join every pair of utterances of a
    dialogue (only ``|i - j| <= window`` when ``window`` is given; self-loops always), inter-modality edges the same
    utterance across modalities; then ``D^-1/2 A D^-1/2`` over the whole graph when ``normalize``. A zero feature
    vector has cosine 0 with everything, itself included (weight 0.5), and gets a zero gradient. A self-loop's
    cosine is the constant 1 (0 for a zero vector), so self-loops carry no gradient.

    ``layout="dense"`` returns ``[M * N, M * N]`` in the global node order, ``layout="blocks"``
    ``[G, M * Lmax, M * Lmax]`` (one padded block per dialogue, modality-major inside, zeros in the padding).
    """
    if layout not in ("dense", "blocks"):
        raise ValueError(f"angular_adjacency_ref: layout must be 'dense' or 'blocks', got {layout!r}")
    M, N, D = features.shape
    lengths = lengths.to(device=features.device, dtype=torch.int64)
    G = lengths.numel()
    node, valid, _ = _dialogue_slots(lengths, M, N)
    l_max = node.shape[1] // M
    unit, nonzero = _unit_rows(features)
    slots_valid = valid.reshape(G, M, l_max)
    # [G, M, Lmax, D] (padding = zero rows) and the per-slot "is a nonzero vector" flag.
    u = unit.reshape(M * N, D)[node].reshape(G, M, l_max, D) * slots_valid[..., None]
    nz = nonzero.reshape(M * N)[node].reshape(G, M, l_max) & slots_valid
    eye_l = torch.eye(l_max, dtype=torch.bool, device=features.device)
    # Intra-modality cosines; the diagonal is replaced by its exact value (1, or 0 for a zero vector).
    cos = u @ u.transpose(-1, -2)
    cos = torch.where(eye_l, torch.diag_embed(nz.to(cos.dtype)), cos)
    pos = torch.arange(l_max, device=features.device)
    intra_mask = slots_valid[..., :, None] & slots_valid[..., None, :]
    if window is not None and window < l_max:  # a wider window (2**63 too) keeps every pair
        intra_mask = intra_mask & ((pos[:, None] - pos[None, :]).abs() <= window)
    intra = _angular_weight(cos, scale) * intra_mask  # [G, M, Lmax, Lmax]
    # Inter-modality cosines of the same utterance: [G, M, M, Lmax].
    cross_cos = torch.einsum("gmid,gnid->gmni", u, u)
    eye_m = torch.eye(M, dtype=torch.bool, device=features.device)
    cross_mask = ~eye_m[None, :, :, None] & slots_valid[:, :, None, :] & slots_valid[:, None, :, :]
    cross = _angular_weight(cross_cos, scale) * cross_mask
    eye_mf = eye_m.to(intra.dtype)
    blocks = torch.einsum("gmij,mn->gminj", intra, eye_mf) + torch.einsum(
        "gmni,ij->gminj", cross, eye_l.to(intra.dtype)
    )
    blocks = blocks.reshape(G, M * l_max, M * l_max)
    if normalize:
        degree = blocks.sum(-1)
        inv_sqrt = torch.where(valid, torch.where(valid, degree, torch.ones_like(degree)).rsqrt(), 0.0)
        blocks = blocks * inv_sqrt[:, :, None] * inv_sqrt[:, None, :]
    if layout == "blocks":
        return blocks
    # Scatter the blocks into the dense matrix; padding slots go to a dummy row/column that is cut off.
    target = torch.where(valid, node, M * N)
    dense = blocks.new_zeros(M * N + 1, M * N + 1)
    dense = dense.index_put((target[:, :, None], target[:, None, :]), blocks)
    return dense[: M * N, : M * N]


def angular_adjacency_mmgcn_loop(
    features: Tensor,
    lengths: Tensor | Sequence[int],
    *,
    scale: float = 0.99999,
    normalize: bool = True,
    window: int | None = None,
) -> Tensor:
    """The dense graph built the way MMGCN's code builds it: Python loops over dialogues, modalities, utterances
    and modality pairs, filling a dense ``[M * N, M * N]`` matrix, then ``D^-1/2 A D^-1/2`` by diagonal matrix
    products. The benchmark baseline of what users run today. A zero feature vector gives NaN here (0 / 0), as in
    the original; ``window`` is an mmer_ext extension, applied as a mask on the intra-modality block."""
    M, N, _ = features.shape
    lengths = [int(v) for v in (lengths.tolist() if isinstance(lengths, Tensor) else lengths)]
    adj = features.new_zeros(M * N, M * N)
    start = 0
    for length in lengths:
        # Intra-modality block of this dialogue, one modality at a time.
        for m in range(M):
            block = features[m, start : start + length]
            norms = torch.sqrt(torch.sum(block * block, dim=1))
            unit = block / norms[:, None]
            sim = torch.matmul(unit, unit.t()) * scale
            weights = 1.0 - torch.acos(sim.clamp(-1.0, 1.0)) / math.pi
            if window is not None:
                offsets = torch.arange(length, device=features.device)
                weights = weights * ((offsets[:, None] - offsets[None, :]).abs() <= window)
            first = m * N + start
            adj[first : first + length, first : first + length] = weights
        # Inter-modality edges: every utterance, every pair of modalities, one cosine at a time.
        for k in range(start, start + length):
            for m in range(M):
                for n in range(m + 1, M):
                    a, b = features[m, k], features[n, k]
                    cos = torch.sum(a * b) / (torch.sqrt(torch.sum(a * a)) * torch.sqrt(torch.sum(b * b)))
                    weight = 1.0 - torch.acos((cos * scale).clamp(-1.0, 1.0)) / math.pi
                    adj[m * N + k, n * N + k] = weight
                    adj[n * N + k, m * N + k] = weight
        start += length
    if normalize:
        degree = adj.sum(1)
        d_inv_sqrt = torch.diag(torch.pow(degree, -0.5))
        adj = d_inv_sqrt.mm(adj).mm(d_inv_sqrt)
    return adj


def block_graph_propagate_ref(blocks: Tensor, x: Tensor, lengths: Tensor, num_modalities: int) -> Tensor:
    """``A @ x`` for node features ``x`` ``[M * N, F]`` in the global node order (``M = num_modalities``), with ``A``
    given as the padded per-dialogue blocks ``[G, M * Lmax, M * Lmax]`` of :func:`angular_adjacency_ref`
    (``layout="blocks"``): gather the nodes into ``[G, M * Lmax, F]``, batched matmul, gather the results back."""
    G, slots, _ = blocks.shape
    M = num_modalities
    node, valid, slot_of_node = _dialogue_slots(lengths.to(device=x.device), M, x.shape[0] // M)
    gathered = x[node] * valid[..., None].to(x.dtype)  # [G, M * Lmax, F]
    out = torch.bmm(blocks, gathered)
    return out.reshape(G * slots, x.shape[1])[slot_of_node]


# ---- MMGCN's GCNII layer -------------------------------------------------------------------------------------------


_MASK32 = 0xFFFFFFFF


def philox4x32_10_ref(counter_lo: int, counter_hi: Tensor, key: int) -> Tensor:
    """Philox-4x32-10 blocks ``[len(counter_hi), 4]`` (int64 holding uint32 words) for the 64-bit counters
    ``(counter_lo, counter_hi[i])`` and 64-bit ``key``: the generator of ``csrc/common/philox.h`` (and curand)."""
    hi = counter_hi.to(torch.int64)
    c = [torch.full_like(hi, counter_lo & _MASK32), torch.full_like(hi, (counter_lo >> 32) & _MASK32),
         hi & _MASK32, (hi >> 32) & _MASK32]
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    for _ in range(10):
        # 32 x 32 -> 64-bit products wrap in int64 but keep their low 64 bits, so both halves come out right.
        p0, p1 = c[0] * 0xD2511F53, c[2] * 0xCD9E8D57
        hi0, lo0 = (p0 >> 32) & _MASK32, p0 & _MASK32
        hi1, lo1 = (p1 >> 32) & _MASK32, p1 & _MASK32
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return torch.stack(c, -1)


def gcnii_dropout_keep_ref(key: int, shape: Sequence[int], dropout: float, counter_lo: int = 0) -> Tensor:
    """The keep mask of :func:`mmer_ext.ops.gcnii_layer`'s in-kernel dropout for Philox key ``key``: element ``i``
    (row-major) is kept iff word ``i % 4`` of block ``(counter_lo, i // 4)`` is ``>= round(dropout * 2^32)``."""
    numel = math.prod(shape)
    words = philox4x32_10_ref(counter_lo, torch.arange((numel + 3) // 4), key).reshape(-1)[:numel]
    threshold = min(int(dropout * 2**32 + 0.5), _MASK32)
    return (words >= threshold).reshape(tuple(shape))


def gcnii_layer_ref(hi: Tensor, h0: Tensor, weight: Tensor, theta: float, alpha: float, dropout: float = 0.0,
                    *, keep: Tensor | None = None) -> Tensor:
    """``dropout(relu(theta [hi || h0] W + (1 - theta)((1 - alpha) hi + alpha h0)))``: GCNII's layer (``variant=True``)
    as MMGCN stacks it, written out. ``keep``: the dropout's keep mask (``None``: no dropout, whatever ``dropout``)."""
    f = hi.shape[-1]
    pre = theta * (hi @ weight[:f] + h0 @ weight[f:]) + (1.0 - theta) * ((1.0 - alpha) * hi + alpha * h0)
    out = torch.relu(pre)
    return out if keep is None else out * keep.to(out.dtype) / (1.0 - dropout)


def attention_ref(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None, dropout: float = 0.0, *,
                  scale: float | None = None, keep: Tensor | None = None) -> Tensor:
    """``(softmax(scale q k^T, -inf where mask) * keep / (1 - dropout)) v``, written out: the oracle of
    :func:`mmer_ext.ops.attention`. ``keep``: the dropout's ``[B, H, Lq, Lk]`` keep mask (``None``: no dropout,
    whatever ``dropout``; the op's is ``gcnii_dropout_keep_ref(rng[0], (B, H, Lq, Lk), dropout, rng[1])``). A row
    blocked everywhere gives zeros, as the op defines it."""
    if scale is None:
        scale = query.shape[-1] ** -0.5 if query.shape[-1] else 1.0  # D = 0: every score is 0 whatever the scale
    scores = scale * query @ key.transpose(-1, -2)
    weights = torch.softmax(scores if mask is None else scores.masked_fill(mask, float("-inf")), dim=-1)
    if mask is not None:  # all-blocked rows are 0/0 in softmax: zeros by definition (NaN from NaN input stays)
        weights = weights.masked_fill(mask.all(-1, keepdim=True), 0.0)
    if keep is not None:
        weights = weights * keep.to(weights.dtype) / (1.0 - dropout)
    return weights @ value


# ---- score-based sampling steps (IMDer's VE SDE, predictor-corrector, DDIM) ----------------------------------------
#
# ``x`` is ``[B, ...]``. ``t`` / ``alpha_bar_*`` are a Python float, a 0-d tensor, or a ``[B]`` tensor broadcast over
# the non-batch dimensions. Coefficients are computed in float64 (or t's dtype if wider) and rounded to ``x.dtype``
# once, then applied in ``x.dtype``. The noisy references take the noise as an argument: they define what the fused
# ops compute with ``noise=``.


def _per_sample(value: float | Tensor, x: Tensor) -> Tensor:
    """``value`` as a float64 tensor that broadcasts against ``x``: 0-d, or ``[B, 1, ..., 1]`` for a ``[B]`` tensor."""
    if not isinstance(value, Tensor):
        return torch.tensor(float(value), dtype=torch.float64, device=x.device)
    value = value.to(device=x.device, dtype=torch.promote_types(value.dtype, torch.float64))
    if value.dim() == 1:
        value = value.reshape(value.shape[0], *([1] * (x.dim() - 1)))
    return value


def _as_time(t: float | Tensor) -> Tensor:
    if isinstance(t, Tensor):
        return t
    return torch.tensor(float(t), dtype=torch.get_default_dtype())


def ve_marginal_std_ref(t: float | Tensor, sigma: float = 25.0) -> Tensor:
    """``sqrt((sigma^(2t) - 1) / (2 ln sigma))``, the marginal std of IMDer's VE SDE at time ``t`` (elementwise).

    Written with ``expm1``: equal to IMDer's ``(sigma**(2t) - 1) / 2 / log(sigma)`` in exact arithmetic, and keeps
    full relative precision near ``t = 0`` (t = 1e-5 loses 3 digits in float32 the other way)."""
    t = _as_time(t)
    log_sigma = math.log(sigma)
    return torch.sqrt(torch.expm1(2.0 * log_sigma * t) / (2.0 * log_sigma))


def ve_diffusion_coeff_ref(t: float | Tensor, sigma: float = 25.0) -> Tensor:
    """``g(t) = sigma^t`` (elementwise)."""
    t = _as_time(t)
    return torch.exp(math.log(sigma) * t)


def ve_perturb_ref(x: Tensor, t: float | Tensor, sigma: float = 25.0, *, noise: Tensor) -> Tensor:
    """``x + std(t) * noise``."""
    std = ve_marginal_std_ref(_per_sample(t, x), sigma).to(x.dtype)
    return x + std * noise


def ve_sde_em_step_ref(
    x: Tensor, score: Tensor, t: float | Tensor, dt: float, sigma: float = 25.0, *, noise: Tensor
) -> tuple[Tensor, Tensor]:
    """One reverse-time Euler-Maruyama step of the VE SDE (IMDer's sampler loop body).

    ``x_mean = x + g(t)^2 * score * dt``; ``x_next = x_mean + sqrt(dt) * g(t) * noise``. Returns ``(x_next, x_mean)``.
    """
    g = ve_diffusion_coeff_ref(_per_sample(t, x), sigma)
    drift = (g * g * dt).to(x.dtype)
    diffusion = (math.sqrt(dt) * g).to(x.dtype)
    x_mean = x + drift * score
    return x_mean + diffusion * noise, x_mean


def ve_ode_step_ref(x: Tensor, score: Tensor, t: float | Tensor, dt: float, sigma: float = 25.0) -> Tensor:
    """One Euler step of the probability-flow ODE: ``x + 0.5 * g(t)^2 * score * dt``."""
    g = ve_diffusion_coeff_ref(_per_sample(t, x), sigma)
    return x + (0.5 * g * g * dt).to(x.dtype) * score


def langevin_corrector_step_ref(x: Tensor, score: Tensor, snr: float, *, noise: Tensor) -> tuple[Tensor, Tensor]:
    """One Langevin corrector step (Song et al. 2021, predictor-corrector), with per-sample step sizes.

    For each sample ``b``: ``eps_b = 2 * (snr * ||noise_b|| / ||score_b||)^2`` (0 where ``||score_b|| = 0``),
    ``x_mean = x + eps_b * score``, ``x_next = x_mean + sqrt(2 * eps_b) * noise``. Returns ``(x_next, x_mean)``.
    Song's code averages the two norms over the batch instead (one step size for all samples); per-sample sizes make
    each sample's update independent of the others in the batch. Norms are taken in float64.
    """
    B = x.shape[0]
    view = (B,) + (1,) * (x.dim() - 1)
    per_sample = math.prod(x.shape[1:])
    score_norm = torch.linalg.vector_norm(score.reshape(B, per_sample).double(), dim=1)
    noise_norm = torch.linalg.vector_norm(noise.reshape(B, per_sample).double(), dim=1)
    nonzero = score_norm > 0
    ratio = snr * noise_norm / torch.where(nonzero, score_norm, torch.ones_like(score_norm))
    eps = torch.where(nonzero, 2.0 * ratio * ratio, torch.zeros_like(ratio))
    x_mean = x + eps.to(x.dtype).reshape(view) * score
    return x_mean + torch.sqrt(2.0 * eps).to(x.dtype).reshape(view) * noise, x_mean


def ddim_coefficients_ref(
    alpha_bar_t: Tensor, alpha_bar_prev: Tensor, eta: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(1/sqrt(ab_t), sqrt(1-ab_t)/sqrt(ab_t), sqrt(ab_prev), sqrt(1-ab_prev-s^2), s)`` of a DDIM step, with
    ``s = eta * sqrt((1-ab_prev)/(1-ab_t) * (1 - ab_t/ab_prev))``. Rounding guards: ``s = 0`` when ``ab_t = 1`` or the
    product is negative (``ab_t > ab_prev``), and ``1 - ab_prev - s^2`` is floored at 0."""
    ab_t, ab_prev = alpha_bar_t, alpha_bar_prev
    one_minus_t = 1.0 - ab_t
    safe = one_minus_t > 0
    var = (1.0 - ab_prev) / torch.where(safe, one_minus_t, torch.ones_like(one_minus_t)) * (1.0 - ab_t / ab_prev)
    var = torch.where(safe, var.clamp(min=0.0), torch.zeros_like(var))
    s = eta * torch.sqrt(var)
    direction = torch.sqrt((1.0 - ab_prev - s * s).clamp(min=0.0))
    return torch.rsqrt(ab_t), torch.sqrt(one_minus_t) * torch.rsqrt(ab_t), torch.sqrt(ab_prev), direction, s


def ddim_step_ref(
    x_t: Tensor,
    eps: Tensor,
    alpha_bar_t: float | Tensor,
    alpha_bar_prev: float | Tensor,
    eta: float = 0.0,
    *,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM step (Song et al. 2021, eq. 12) for a model predicting ``eps``. Returns ``(x_prev, x0_pred)``.

    ``x0 = (x_t - sqrt(1-ab_t) eps) / sqrt(ab_t)``; ``x_prev = sqrt(ab_prev) x0 + sqrt(1-ab_prev-s^2) eps + s z``
    (coefficients: :func:`ddim_coefficients_ref`). ``noise`` is required unless ``eta == 0``.
    """
    if noise is None and eta != 0.0:
        raise ValueError("ddim_step_ref: noise is required when eta != 0")
    c_x, c_e, a, d, s = (c.to(x_t.dtype) for c in ddim_coefficients_ref(
        _per_sample(alpha_bar_t, x_t), _per_sample(alpha_bar_prev, x_t), eta
    ))
    x0 = c_x * x_t - c_e * eps
    x_prev = a * x0 + d * eps
    if noise is not None:
        x_prev = x_prev + s * noise
    return x_prev, x0
