r"""The embedded synthetic dataset: offline, seeded, IEMOCAP-shaped utterances for every demo and test.

The real IEMOCAP features of MMIN / IF-MMIN / NMER are not redistributable (and their only download link is dead,
MMIN#11), so every default in this package runs on data generated here. The generator imitates what matters to
missing-modality emotion recognition: frame sequences of the three modalities with IEMOCAP's feature sizes and
class imbalance, modalities of different informativeness (lexical > acoustic > visual), and a latent state shared
by the modalities so that a missing modality is partly predictable from the others - the premise of MMIN's
"imagination" - while each modality also carries nuisance the others cannot explain.

Generative model
----------------
All draws come from ``torch.Generator`` objects derived from ``seed``: one for the *structure* (class means,
projections, speaker offsets; shared by all splits) and one per split, so the validation and test sets do not
change when ``n_train`` does. Notation: :math:`K` emotion-latent size (``latent_dim``), :math:`K_c` context-latent
size (``context_dim``), :math:`D_m` feature size of modality :math:`m \in \{A, V, L\}`, :math:`N(0, I)` standard
normal, :math:`[a; b]` concatenation.

*Structure.* Class means :math:`\mu_c \in R^K`: coordinates 0 and 1 are arousal and valence,
:math:`(\mu_{c,0}, \mu_{c,1})` = happy (1, 1), angry (1, -1), sad (-1, -0.8), neutral (0, 0); coordinates
:math:`2..K-1` are :math:`\nu \sqrt{K-2}\, q_c` with :math:`q_0..q_3` random orthonormal vectors (so every pair of
classes is equally far apart there and the difficulty does not depend on the seed; plain :math:`N(0, \nu^2)` draws
when :math:`K < 6`). Speaker offsets :math:`\delta_s \sim N(0, I_K)`. Per modality a loading vector
:math:`w_m \in R^{K+K_c}` - (arousal, valence, other emotion coordinates) weights from ``MODALITY_PROFILES``
(acoustic: 1.0, 0.25, 0.45 - prosody mostly tells arousal; visual: 0.45, 0.45, 0.35; lexical: 0.6, 1.0, 0.9) and
:math:`\kappa` on the context coordinates - a nuisance scale :math:`b_m` (A 1.0, V 1.3, L 1.1) and a projection
:math:`P_m \in R^{D_m \times (K+K_c)}` with :math:`N(0, 1/(K+K_c))` entries.

*Utterance* :math:`i` with label :math:`y_i` and speaker :math:`s_i` (no speaker term without speakers):

.. math::

    z_i &= \rho\,\mu_{y_i} + \lambda\,\delta_{s_i} + \sigma_z\,n_i, \qquad n_i \sim N(0, I_K)
        \quad\text{(emotional state, shared by the modalities)} \\
    c_i &\sim N(0, I_{K_c}) \quad\text{(class-free context: speaking style, session; shared by the modalities)} \\
    u_{m,i} &= w_m \odot [z_i; c_i] + b_m\,\epsilon_{m,i}, \qquad \epsilon_{m,i} \sim N(0, I_{K+K_c})
        \quad\text{(modality view; its nuisance lies in the same subspace, so it cannot be projected out)} \\
    x_{m,i,t} &= e_{m,i,t}\, P_m u_{m,i} + \sigma_f\,\xi_{m,i,t}, \qquad \xi \sim N(0, I_{D_m}),
        \quad t = 0..T_{m,i}-1 \\
    e_{m,i,t} &= 1 + \gamma \sin(2\pi\, t / T_{m,i} + \phi_{m,i}), \qquad \phi_{m,i} \sim U(0, 2\pi)

with :math:`\rho` = ``class_sep`` (1.0), :math:`\nu` = ``other_sep`` (0.6), :math:`\sigma_z` = ``shared_noise``
(0.5), :math:`\kappa` = ``context_weight`` (1.5), :math:`\lambda` = ``speaker_effect`` (0.3), :math:`\sigma_f` =
``frame_noise`` (1.0), :math:`\gamma` = ``modulation`` (0.5). Every frame carries the utterance signal (scaled by a
smooth positive envelope), so an LSTM with max-pooling over time and a TextCNN with kernels 3-5 over time both see
it; the per-frame noise averages out over time, the nuisance :math:`b_m \epsilon_{m,i}` and the shared
:math:`\sigma_z n_i` do not - they cap the achievable accuracy per modality and jointly, so fusing modalities
helps (their nuisances are independent) but never reaches 100 %. The shared context :math:`c_i` carries no class
information but makes each modality's features partly predictable from the other two, which is what an
imagination / reconstruction module can exploit.

*Lengths.* A duration :math:`d_i \sim U(0, 1)` shared by the modalities sets
:math:`T_{m,i} = \mathrm{clip}(\mathrm{round}(lo_m + (d_i + 0.1\,\eta_{m,i})(hi_m - lo_m)), lo_m, hi_m)`,
:math:`\eta \sim N(0, 1)`, so the three lengths are correlated as in real recordings.

*Labels.* Without dialogues each split has exactly IEMOCAP's class proportions (happy+excited 1636, angry 1103,
sad 1084, neutral 1708; largest-remainder rounding) in random order. With ``dialogue_lengths=(lo, hi)`` the split is
cut into consecutive dialogues of :math:`U\{lo..hi\}` utterances (the last one truncated), each with two speakers
taking turns (the turn passes with probability 0.8), and labels follow a Markov chain with inertia along the
dialogue: :math:`y_0 \sim \pi`, and :math:`y_{k+1} = y_k` with probability ``label_inertia``, else a fresh
:math:`\pi` draw, so :math:`\pi` (IEMOCAP's proportions) stays the stationary distribution.

*Speakers.* ``num_speakers`` speakers (10 when dialogues are requested and it is not given, as IEMOCAP); with
``speaker_independent`` (default) they are partitioned over the splits in proportion to the split sizes, as IEMOCAP's
leave-one-session-out folds keep test speakers unseen (at least two per split when dialogues are requested and
there are enough speakers; a split with a single speaker gets monologues).

Calibration (measured with ``calibration_report``: logistic regression, C = 0.1, on standardised time-averaged
features, fit on train and scored on test; ridge R^2 on test). ``preset="iemocap"``, 3000/600/1200, seeds 0 / 1:
full 0.728 / 0.718, L 0.630 / 0.638, A 0.542 / 0.507, V 0.400 / 0.388 (majority class 0.309); R^2 of A from V+L
0.30 / 0.27 (V from A+L 0.23 / 0.22, L from A+V 0.27 / 0.25). ``preset="small"`` with 3000 train / 1200 test gives
full 0.75, L 0.66, A 0.54, V 0.42, R^2(A | V, L) 0.30. A one-layer LSTM with max-pool (A, V) and a TextCNN (L)
trained briefly on the small preset reach about the same per-modality accuracies, so the signal is visible to the
MMIN encoders, not only to averages.

Sentiment sequences (IMDer, MOSI-shaped): :func:`make_synthetic_sequences` has its own generative model (a shared
latent trajectory, a continuous label in [-3, 3]; see its docstring) and :func:`regression_calibration_report` its
probes.

ERC dialogues (MMGCN, IEMOCAP-ERC-shaped): :func:`make_synthetic_dialogues` runs the utterance model above in a
*vector mode* (one feature vector per utterance) with IEMOCAP-ERC's six classes (see its docstring).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence

import torch

from mmer_ext.corpora import IEMOCAP_ERC_CLASS_FREQUENCIES, IEMOCAP_ERC_CLASS_NAMES
from mmer_ext.data.dialogue import VAL_PROTOCOLS, DialogueDataset
from mmer_ext.data.erc import IEMOCAP_ERC_DIMS
from mmer_ext.seeding import derive_seed
from mmer_ext.data.sequences import SequenceDataset
from mmer_ext.data.utterance import MODALITIES, ModalityDims, UtteranceDataset

CLASS_NAMES = ("happy", "angry", "sad", "neutral")
IEMOCAP_CLASS_COUNTS = (1636, 1103, 1084, 1708)
SPLITS = ("train", "val", "test")

# (arousal, valence) of each class; the remaining latent coordinates of the class means are random.
_AROUSAL_VALENCE = ((1.0, 1.0), (1.0, -1.0), (-1.0, -0.8), (0.0, 0.0))
# Per modality: (weight on arousal, weight on valence, weight on the other coordinates, nuisance scale b_m).
MODALITY_PROFILES = {
    "A": (1.0, 0.25, 0.45, 1.0),
    "V": (0.45, 0.45, 0.35, 1.3),
    "L": (0.6, 1.0, 0.9, 1.1),
}

PRESETS = {
    "iemocap": {
        "dims": ModalityDims(130, 342, 1024),
        "seq_len": ((10, 40), (8, 32), (5, 25)),
        "sizes": (3000, 600, 1200),
    },
    "small": {
        "dims": ModalityDims(20, 24, 32),
        "seq_len": ((8, 24), (6, 20), (5, 16)),
        "sizes": (600, 150, 300),
    },
}


def _gen(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, stream, scheme="splitmix"))


def _proportional_counts(total: int, weights: Sequence[float], minimum: Sequence[int] | None = None) -> list[int]:
    """Largest-remainder apportionment of ``total`` into ``len(weights)`` integer parts."""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    exact = w / w.sum() * total
    counts = torch.floor(exact).to(torch.int64)
    rem = total - int(counts.sum())
    order = torch.argsort(exact - counts, descending=True, stable=True)
    counts[order[:rem]] += 1
    counts = counts.tolist()
    if minimum is not None:
        for k, lo in enumerate(minimum):
            while counts[k] < lo:
                donor = max(range(len(counts)), key=lambda j: counts[j] - (minimum[j]))
                if counts[donor] - minimum[donor] <= 0:
                    raise ValueError(f"cannot give every part its minimum: total {total}, minima {list(minimum)}")
                counts[donor] -= 1
                counts[k] += 1
    return counts


def _structure(g: torch.Generator, k: int, kc: int, dims: ModalityDims, num_speakers: int, other_sep: float,
               context_weight: float) -> dict:
    if k < 2:
        raise ValueError("latent_dim must be >= 2 (arousal and valence)")
    if kc < 0:
        raise ValueError("context_dim must be >= 0")
    mu = torch.empty(4, k)
    mu[:, :2] = torch.tensor(_AROUSAL_VALENCE)
    other = torch.randn(k - 2, 4, generator=g, dtype=torch.float64)
    if k - 2 >= 4:
        # Random orthonormal directions: every pair of classes is equally far apart in these coordinates, so the
        # difficulty does not depend on the seed (independent draws would make some seeds much easier).
        other = torch.linalg.qr(other).Q * math.sqrt(k - 2)
    mu[:, 2:] = other_sep * other.T.to(torch.float32)
    proj = {m: torch.randn(dims[j], k + kc, generator=g) / math.sqrt(k + kc) for j, m in enumerate(MODALITIES)}
    spk = torch.randn(max(num_speakers, 1), k, generator=g)
    w = {}
    for m in MODALITIES:
        wa, wv, wo, _ = MODALITY_PROFILES[m]
        w[m] = torch.cat([torch.tensor([wa, wv]), torch.full((k - 2,), wo), torch.full((kc,), context_weight)])
    return {"mu": mu, "proj": proj, "spk": spk, "w": w}


def _lengths(g: torch.Generator, n: int, seq_len) -> torch.Tensor:
    d = torch.rand(n, generator=g)
    out = torch.empty(n, 3, dtype=torch.int64)
    for j, (lo, hi) in enumerate(seq_len):
        jitter = 0.1 * torch.randn(n, generator=g)
        t = torch.round(lo + (d + jitter) * (hi - lo)).clamp(lo, hi)
        out[:, j] = t.to(torch.int64)
    return out


def _frames(g: torch.Generator, signal: torch.Tensor, lens: torch.Tensor, frame_noise: float,
            modulation: float) -> list[torch.Tensor]:
    """``x_t = e_t * signal_i + frame_noise * xi_t`` for all utterances at once; returns per-utterance views."""
    n, d = signal.shape
    total = int(lens.sum())
    utt = torch.repeat_interleave(torch.arange(n), lens)
    starts = torch.cumsum(lens, 0) - lens
    pos = (torch.arange(total) - starts[utt]).to(torch.float32)
    phase = torch.rand(n, generator=g) * (2 * math.pi)
    env = 1.0 + modulation * torch.sin(2 * math.pi * pos / lens[utt].to(torch.float32) + phase[utt])
    flat = torch.randn(total, d, generator=g)
    flat.mul_(frame_noise).addcmul_(signal[utt], env.unsqueeze(1))
    return list(torch.split(flat, lens.tolist()))


def _speaker_pools(num_speakers: int, sizes: Sequence[int], independent: bool, dialogues: bool) -> list[torch.Tensor]:
    if not independent:
        return [torch.arange(num_speakers) for _ in sizes]
    nonempty = [k for k, s in enumerate(sizes) if s > 0]
    if num_speakers < len(nonempty):
        raise ValueError(f"speaker_independent splits need at least {len(nonempty)} speakers, got {num_speakers}")
    # Two speakers per split when there are enough, so that every dialogue can have two distinct speakers.
    least = 2 if dialogues and num_speakers >= 2 * len(nonempty) else 1
    counts = [0] * len(sizes)
    sub = _proportional_counts(num_speakers, [sizes[k] for k in nonempty], minimum=[least] * len(nonempty))
    for k, c in zip(nonempty, sub):
        counts[k] = c
    pools, start = [], 0
    for c in counts:
        pools.append(torch.arange(start, start + c))
        start += c
    return pools


def _split_labels(g: torch.Generator, n: int, pool: torch.Tensor | None, dialogue_lengths, inertia: float):
    """Labels, speakers and (split-local) dialogue ids of one split."""
    prior = torch.tensor(IEMOCAP_CLASS_COUNTS, dtype=torch.float64)
    if n == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, None if pool is None else empty, None if dialogue_lengths is None else empty
    if dialogue_lengths is None:
        counts = _proportional_counts(n, IEMOCAP_CLASS_COUNTS)
        labels = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))[torch.randperm(n, generator=g)]
        speakers = None
        if pool is not None:
            speakers = pool[torch.randint(0, pool.numel(), (n,), generator=g)]
        return labels, speakers, None
    lo, hi = (int(dialogue_lengths[0]), int(dialogue_lengths[1]))
    if not 1 <= lo <= hi:
        raise ValueError(f"dialogue_lengths must be (lo, hi) with 1 <= lo <= hi, got {dialogue_lengths}")
    draws = torch.randint(lo, hi + 1, (n // lo + 1,), generator=g)
    ends = torch.cumsum(draws, 0)
    num_dlg = int(torch.searchsorted(ends, torch.tensor([n]), right=False)[0]) + 1 if n else 0
    dlg_len = draws[:num_dlg].clone()
    if num_dlg:
        dlg_len[-1] -= int(ends[num_dlg - 1]) - n
    dlg = torch.repeat_interleave(torch.arange(num_dlg), dlg_len)
    starts = torch.cumsum(dlg_len, 0) - dlg_len
    is_start = torch.zeros(n, dtype=torch.bool)
    is_start[starts] = True
    # Labels: Markov chain with inertia, restarted at each dialogue.
    stay = (torch.rand(n, generator=g) < inertia) & ~is_start
    fresh = torch.multinomial(prior, n, replacement=True, generator=g) if n else torch.zeros(0, dtype=torch.int64)
    src = torch.where(stay, torch.zeros(n, dtype=torch.int64), torch.arange(n))
    labels = fresh[torch.cummax(src, 0).values] if n else fresh
    # Speakers: two per dialogue, taking turns.
    p = pool.numel()
    ia = torch.randint(0, p, (num_dlg,), generator=g)
    ib = (ia + 1 + torch.randint(0, max(p - 1, 1), (num_dlg,), generator=g)) % p if p > 1 else ia
    switch = (torch.rand(n, generator=g) < 0.8) & ~is_start
    turns = torch.cumsum(switch.to(torch.int64), 0)
    parity = (turns - turns[starts][dlg]) % 2 if n else turns
    speakers = torch.where(parity == 0, pool[ia][dlg], pool[ib][dlg]) if n else torch.zeros(0, dtype=torch.int64)
    return labels, speakers, dlg


def make_synthetic_utterances(
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    *,
    preset: str = "iemocap",
    dims: ModalityDims | Sequence[int] | None = None,
    seq_len: Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
    num_speakers: int | None = None,
    speaker_independent: bool = True,
    dialogue_lengths: tuple[int, int] | None = None,
    label_inertia: float = 0.7,
    latent_dim: int = 8,
    context_dim: int = 4,
    class_sep: float = 1.0,
    other_sep: float = 0.6,
    shared_noise: float = 0.5,
    context_weight: float = 1.5,
    speaker_effect: float = 0.3,
    frame_noise: float = 1.0,
    modulation: float = 0.5,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, UtteranceDataset]:
    """Generate the synthetic train / val / test splits (see the module docstring for the generative model).

    Parameters
    ----------
    n_train, n_val, n_test : int, optional
        Utterances per split; default from the preset (iemocap 3000 / 600 / 1200, small 600 / 150 / 300).
    preset : {"iemocap", "small"}
        ``iemocap``: IEMOCAP feature sizes 130 / 342 / 1024; ``small``: 20 / 24 / 32 and shorter sequences (tests,
        CPU demos). ``dims`` / ``seq_len`` override the preset.
    dims : ModalityDims, optional
    seq_len : ((lo, hi), (lo, hi), (lo, hi)), optional
        Inclusive frame-count range per modality (A, V, L). Keep ``lo`` of L >= 5 for TextCNN kernels of height 5.
    seed : int
        Everything is a deterministic function of the arguments; the same seed gives identical tensors.
    num_speakers, speaker_independent, dialogue_lengths, label_inertia
        Speaker and dialogue structure (for dialogue-graph models); see the module docstring. With dialogues the
        datasets get ``speakers`` and ``dialogues`` (ids unique across the splits); with speakers only, ``speakers``.
    latent_dim, context_dim, class_sep, other_sep, shared_noise, context_weight, speaker_effect, frame_noise, modulation
        Generative-model constants (``K``, ``K_c``, ``rho``, ``nu``, ``sigma_z``, ``kappa``, ``lambda``, ``sigma_f``,
        ``gamma``); the defaults are the calibrated ones.
    cache_dir : path, optional
        When given, the splits are stored under ``cache_dir/synthetic-<hash of the arguments>/`` and loaded from there
        on later calls.

    Returns
    -------
    dict
        ``{"train": UtteranceDataset, "val": ..., "test": ...}`` with ``class_names = ("happy", "angry", "sad",
        "neutral")``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {tuple(PRESETS)}")
    cfg = PRESETS[preset]
    sizes = [cfg["sizes"][k] if n is None else int(n) for k, n in enumerate((n_train, n_val, n_test))]
    if any(s < 0 for s in sizes):
        raise ValueError(f"split sizes must be >= 0, got {sizes}")
    dims = ModalityDims(*(int(d) for d in (cfg["dims"] if dims is None else dims)))
    seq_len = tuple((int(lo), int(hi)) for lo, hi in (cfg["seq_len"] if seq_len is None else seq_len))
    if len(seq_len) != 3 or any(not 1 <= lo <= hi for lo, hi in seq_len):
        raise ValueError(f"seq_len must be three (lo, hi) ranges with 1 <= lo <= hi, got {seq_len}")
    if dialogue_lengths is not None and num_speakers is None:
        num_speakers = 10
    if num_speakers is not None and num_speakers < 1:
        raise ValueError("num_speakers must be >= 1")

    args = dict(sizes=sizes, dims=list(dims), seq_len=[list(r) for r in seq_len], seed=int(seed),
                num_speakers=num_speakers, speaker_independent=bool(speaker_independent),
                dialogue_lengths=None if dialogue_lengths is None else [int(x) for x in dialogue_lengths],
                label_inertia=float(label_inertia), latent_dim=int(latent_dim), context_dim=int(context_dim),
                class_sep=float(class_sep), other_sep=float(other_sep), shared_noise=float(shared_noise),
                context_weight=float(context_weight), speaker_effect=float(speaker_effect),
                frame_noise=float(frame_noise), modulation=float(modulation), version=1)
    cache_path = None
    if cache_dir is not None:
        key = hashlib.sha1(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
        cache_path = os.path.join(os.fspath(cache_dir), f"synthetic-{key}")
        files = [os.path.join(cache_path, f"{s}.safetensors") for s in SPLITS]
        if all(os.path.exists(f) for f in files):
            return {s: UtteranceDataset.load(f) for s, f in zip(SPLITS, files)}

    st = _structure(_gen(seed, 0), latent_dim, context_dim, dims, num_speakers or 0, other_sep, context_weight)
    pools = _speaker_pools(num_speakers, sizes, speaker_independent,
                                                       dialogue_lengths is not None) if num_speakers else [None] * 3
    out: dict[str, UtteranceDataset] = {}
    dlg_offset = 0
    for k, (split, n) in enumerate(zip(SPLITS, sizes)):
        g = _gen(seed, k + 1)
        labels, speakers, dlg = _split_labels(g, n, pools[k], dialogue_lengths, label_inertia)
        z = class_sep * st["mu"][labels] + shared_noise * torch.randn(n, latent_dim, generator=g)
        if speakers is not None:
            z += speaker_effect * st["spk"][speakers]
        state = torch.cat([z, torch.randn(n, context_dim, generator=g)], 1)
        lens = _lengths(g, n, seq_len)
        feats = {}
        for j, m in enumerate(MODALITIES):
            u = st["w"][m] * state + MODALITY_PROFILES[m][3] * torch.randn(n, latent_dim + context_dim, generator=g)
            feats[m] = _frames(g, u @ st["proj"][m].T, lens[:, j], frame_noise, modulation)
        if dlg is None:
            names = [f"syn_{split}_{i:05d}" for i in range(n)]
        else:
            local = torch.arange(n) - (torch.cumsum(torch.bincount(dlg), 0) - torch.bincount(dlg))[dlg]
            names = [f"syn_{split}_d{d:04d}_u{u:03d}" for d, u in zip(dlg.tolist(), local.tolist())]
            num_dlg = int(dlg.max()) + 1 if n else 0
            dlg = dlg + dlg_offset
            dlg_offset += num_dlg
        out[split] = UtteranceDataset(feats["A"], feats["V"], feats["L"], labels, names, class_names=CLASS_NAMES,
                                      dims=dims, speakers=speakers, dialogues=dlg)
    if cache_path is not None:
        for s, ds in out.items():
            ds.save(os.path.join(cache_path, f"{s}.safetensors"))
    return out


def calibration_report(splits: dict[str, UtteranceDataset], max_iter: int = 2000) -> dict[str, float]:
    """Linear probes of a split dict (needs scikit-learn): how informative each modality is, and how predictable.

    Logistic regression on standardised time-averaged features, fit on ``train`` and scored on ``test``, for each
    modality alone and all three concatenated (keys ``acc_A``, ``acc_V``, ``acc_L``, ``acc_full``, plus the
    majority-class rate ``acc_chance``), and the test R^2 (uniform average over feature dims) of a ridge regression
    (alpha by leave-one-out CV) of each modality's time-averaged
    features from the other two (``r2_A_from_VL`` ...). Used to calibrate the generator; not a test.
    """
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tr, te = splits["train"], splits["test"]
    ftr, fte = tr.mean_features(), te.mean_features()
    ytr, yte = tr.labels.numpy(), te.labels.numpy()
    res: dict[str, float] = {"acc_chance": float((yte == torch.bincount(tr.labels).argmax().item()).mean())}
    groups = {"A": ["A"], "V": ["V"], "L": ["L"], "full": ["A", "V", "L"]}
    for key, ms in groups.items():
        xtr = torch.cat([ftr[m] for m in ms], 1).numpy()
        xte = torch.cat([fte[m] for m in ms], 1).numpy()
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, C=0.1))
        clf.fit(xtr, ytr)
        res[f"acc_{key}"] = float(clf.score(xte, yte))
    for m in MODALITIES:
        others = [o for o in MODALITIES if o != m]
        xtr = torch.cat([ftr[o] for o in others], 1).numpy()
        xte = torch.cat([fte[o] for o in others], 1).numpy()
        reg = make_pipeline(StandardScaler(), RidgeCV(alphas=(1.0, 10.0, 100.0, 1000.0, 10000.0)))
        reg.fit(xtr, ftr[m].numpy())
        res[f"r2_{m}_from_{''.join(others)}"] = float(reg.score(xte, fte[m].numpy()))
    return res


# ======================================================================================================================
# Synthetic sentiment sequences (MOSI-like, for IMDer)
# ======================================================================================================================
SEQUENCE_PRESETS = {
    "mosi": {"dims": ModalityDims(5, 20, 768), "sizes": (1284, 229, 686)},
    "small": {"dims": ModalityDims(5, 20, 32), "sizes": (400, 100, 200)},
}
# Per modality: (weight of the sentiment coordinate, private nuisance scale b_m). Text carries the most sentiment,
# as on MOSI where the lexical modality dominates every unimodal result.
_SEQUENCE_PROFILES = {
    "A": (0.6, 0.8),
    "V": (0.45, 0.9),
    "L": (1.0, 0.8),
}


def _loadings(g: torch.Generator, d: int, k: int) -> torch.Tensor:
    """``[d, k]`` projection with orthonormal columns (rows when d < k), scaled so every feature dimension of
    ``P u`` has variance ``|u|^2 / k``; well conditioned, so the difficulty does not depend on the seed."""
    q = torch.linalg.qr(torch.randn(max(d, k), min(d, k), generator=g, dtype=torch.float64)).Q
    p = q * math.sqrt(d / k) if d >= k else q.T
    return p.to(torch.float32)


def make_synthetic_sequences(
    preset: str = "mosi",
    *,
    seed: int = 0,
    sizes: Sequence[int] | None = None,
    seq_len: int = 50,
    dims: ModalityDims | Sequence[int] | None = None,
    latent_dim: int = 4,
    sentiment_mode: float = 1.2,
    sentiment_spread: float = 0.9,
    annotators: int = 5,
    annotator_noise: float = 0.6,
    trajectory: float = 0.7,
    smoothness: float = 0.9,
    context_weight: float = 1.0,
    frame_noise: float = 0.7,
):
    r"""MOSI-shaped synthetic sentiment data: aligned A / V / L sequences and a continuous label in [-3, 3].

    The embedded default for IMDer and the missing-rate sweep (the MOSI / MOSEI features cannot be shipped).

    Generative model
    ----------------
    Notation: :math:`K` latent size (``latent_dim``), :math:`T` = ``seq_len``, :math:`D_m` feature size of
    modality :math:`m \in \{A, V, L\}`. *Structure* (one ``torch.Generator`` per seed, shared by the splits):
    a projection :math:`P_m \in R^{D_m \times K}` per modality with orthonormal columns scaled by
    :math:`\sqrt{D_m / K}`, and the loading :math:`w_m = (\omega_m, \kappa, \dots, \kappa) \in R^K`.
    Sample :math:`i` (one generator per split, so val / test do not change with the train size):

    .. math::

        s_i &= \pm\mu + \tau_s n_i \quad(\text{sign} \pm \text{ with prob. } 1/2,\ n_i \sim N(0, 1))
            \quad\text{true sentiment, bimodal as MOSI's opinion clips} \\
        y_i &= \frac{1}{R} \sum_{k=1}^{R} \mathrm{clip}(\mathrm{round}(s_i + \tau_a e_{ik}), -3, 3),
            \quad e_{ik} \sim N(0, 1) \quad\text{(label: mean of } R \text{ annotators' integer scores)} \\
        z_i &= (s_i / S,\ c_i), \quad S = \sqrt{\mu^2 + \tau_s^2},\ c_i \sim N(0, I_{K-1})
            \quad\text{shared latent state: sentiment + label-free context} \\
        r_{i,0} &\sim N(0, I_K), \quad r_{i,t} = \phi\, r_{i,t-1} + \sqrt{1 - \phi^2}\,\eta_{i,t}
            \quad\text{smooth unit-variance trajectory (AR(1)), shared by the modalities} \\
        h_{i,t} &= z_i + \beta\, r_{i,t} \\
        x_{m,i,t} &= P_m \big(w_m \odot h_{i,t} + b_m\, \varepsilon_{m,i}\big) + \sigma_f\, \xi_{m,i,t},
            \quad \varepsilon_{m,i} \sim N(0, I_K),\ \xi_{m,i,t} \sim N(0, I_{D_m})

    with :math:`\mu` = ``sentiment_mode`` (1.2), :math:`\tau_s` = ``sentiment_spread`` (0.9), :math:`R` =
    ``annotators`` (5; 0 gives the continuous label :math:`\mathrm{clip}(s_i, -3, 3)`), :math:`\tau_a` =
    ``annotator_noise`` (0.6), :math:`\beta` = ``trajectory`` (0.7), :math:`\phi` = ``smoothness`` (0.9, a
    correlation length of about 10 frames), :math:`\kappa` = ``context_weight`` (1.0), :math:`\sigma_f` =
    ``frame_noise`` (0.7), and per modality :math:`(\omega_m, b_m)` = A (0.6, 0.8), V (0.45, 0.9), L (1.0, 0.8).

    What this buys: every frame of every modality is a noisy view of the same trajectory :math:`h_{i,t}`, so a
    missing modality's frames are partly predictable from the other modalities' frames at the same time step (the
    premise of IMDer's conditional recovery) but not entirely (the private :math:`b_m \varepsilon_{m,i}` and the
    frame noise are unpredictable); each modality carries label information through :math:`\omega_m`, text the
    most; the private nuisance lies in the same :math:`K` directions as the signal, so it cannot be projected out
    and caps each modality's accuracy, while the modalities' nuisances are independent, so fusion helps.

    *Labels.* MOSI / MOSEI labels are averages of annotators' integer scores, hence the annotator model: with
    :math:`R = 5` the labels are multiples of 0.2 in [-3, 3] (``annotators=0`` gives continuous labels instead),
    spread over the whole range with mean 0, std 1.5, a fair share near 0 (about 20 % within +-0.5) but only about
    4 % exactly 0 (3-7 % on a split of a few hundred), so the Acc-2 "non0" subset keeps about 96 % of the samples
    and Acc-2 has0 / non0 differ only slightly.

    Calibration (:func:`regression_calibration_report`: ridge on standardised time-averaged features, fit on train,
    MAE on test), ``preset="mosi"`` seeds 0 / 1: predicting the mean 1.257 / 1.254; A 0.999 / 1.032, V 1.097 /
    1.126, L 0.810 / 0.837, all three 0.754 / 0.772 (Corr 0.78 / 0.77); per-frame R^2 of a modality from the other
    two at the same time step A 0.40 / 0.38, V 0.35 / 0.32, L 0.36 / 0.34; labels exactly 0: 5.8 / 5.1 % of the test
    set. ``preset="small"`` seeds 0 / 1: mean 1.176 / 1.283, A 1.007 / 1.004, V 1.115 / 1.202, L 0.794 / 0.847,
    all 0.761 / 0.817.

    Parameters
    ----------
    preset : {"mosi", "small"}
        ``mosi``: dims A 5, V 20, L 768 and sizes 1284 / 229 / 686 (MOSI's); ``small``: dims 5 / 20 / 32 and sizes
        400 / 100 / 200 (tests, CPU demos). ``sizes`` / ``dims`` override the preset.
    seed : int
        Everything is a deterministic function of the arguments.
    sizes : (int, int, int), optional
        Samples in train / val / test.
    seq_len : int
        Frames per sample, the same for the three modalities (aligned data; IMDer needs >= 3).
    dims : ModalityDims, optional
    latent_dim, sentiment_mode, sentiment_spread, annotators, annotator_noise, trajectory, smoothness,
    context_weight, frame_noise
        The constants of the model above; the defaults are the calibrated ones.

    Returns
    -------
    dict
        ``{"train", "val", "test"}`` -> :class:`~mmer_ext.data.SequenceDataset` (aligned; ids
        ``"synmosi_<split>_<i>"``).
    """
    if preset not in SEQUENCE_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {tuple(SEQUENCE_PRESETS)}")
    cfg = SEQUENCE_PRESETS[preset]
    sizes = tuple(int(s) for s in (cfg["sizes"] if sizes is None else sizes))
    if len(sizes) != 3 or any(s < 0 for s in sizes):
        raise ValueError(f"sizes must be three non-negative integers (train, val, test), got {sizes}")
    dims = ModalityDims(*(int(d) for d in (cfg["dims"] if dims is None else dims)))
    if any(d < 1 for d in dims):
        raise ValueError(f"dims must be positive, got {tuple(dims)}")
    if isinstance(seq_len, bool) or int(seq_len) != seq_len or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    t_len = int(seq_len)
    k = int(latent_dim)
    if k < 2:
        raise ValueError("latent_dim must be >= 2 (sentiment and at least one context coordinate)")
    if annotators < 0 or int(annotators) != annotators:
        raise ValueError(f"annotators must be a non-negative integer, got {annotators!r}")
    if not 0.0 <= smoothness < 1.0:
        raise ValueError(f"smoothness must lie in [0, 1), got {smoothness!r}")

    g0 = _gen(seed, 100)
    proj = {m: _loadings(g0, dims[j], k) for j, m in enumerate(MODALITIES)}
    w = {m: torch.tensor([_SEQUENCE_PROFILES[m][0]] + [float(context_weight)] * (k - 1)) for m in MODALITIES}
    scale = math.sqrt(sentiment_mode ** 2 + sentiment_spread ** 2)
    innov = math.sqrt(1.0 - smoothness ** 2)
    out = {}
    for split_k, (split, n) in enumerate(zip(SPLITS, sizes)):
        g = _gen(seed, 101 + split_k)
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        s = sign * sentiment_mode + sentiment_spread * torch.randn(n, generator=g)
        if annotators:
            scores = torch.round(s.unsqueeze(1) + annotator_noise * torch.randn(n, int(annotators), generator=g))
            labels = scores.clamp(-3, 3).mean(1)
        else:
            labels = s.clamp(-3, 3)
        z = torch.cat([(s / scale).unsqueeze(1), torch.randn(n, k - 1, generator=g)], 1)
        r = torch.empty(n, t_len, k)
        r[:, 0] = torch.randn(n, k, generator=g)
        eta = torch.randn(n, t_len, k, generator=g)
        for t in range(1, t_len):
            r[:, t] = smoothness * r[:, t - 1] + innov * eta[:, t]
        h = z.unsqueeze(1) + trajectory * r
        feats = {}
        for m in MODALITIES:
            b = _SEQUENCE_PROFILES[m][1]
            u = w[m] * h + b * torch.randn(n, 1, k, generator=g)
            x = torch.randn(n, t_len, proj[m].shape[0], generator=g)
            feats[m] = x.mul_(frame_noise).add_(u @ proj[m].T)
        ids = [f"synmosi_{split}_{i:05d}" for i in range(n)]
        out[split] = SequenceDataset(feats["A"], feats["V"], feats["L"], labels, ids)
    return out


def regression_calibration_report(splits: dict, alphas: Sequence[float] = (0.1, 1.0, 10.0, 100.0, 1000.0),
                                  ) -> dict[str, float]:
    """Linear probes of a sentiment split dict (needs scikit-learn): how informative and how recoverable each
    modality is.

    Ridge regression (alpha by leave-one-out CV) on standardised time-averaged features, fit on ``train``, scored on
    ``test``: ``mae_<A|V|L|full>`` (each modality alone and all three concatenated), ``mae_mean`` (predicting the
    training mean), ``corr_<...>``; ``frame_r2_<m>``: test R^2 (uniform over feature dims) of each modality's
    *frames* from the other two modalities' frames at the same time step (what a conditional recovery can hope for
    per frame); ``frac_zero`` / ``frac_near0`` (|y| <= 0.5) of the test labels. Used to calibrate the generator.
    """
    import numpy as np
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tr, te = splits["train"], splits["test"]
    ftr, fte = tr.mean_features(), te.mean_features()
    ytr, yte = tr.labels.double().numpy(), te.labels.double().numpy()
    res: dict[str, float] = {"mae_mean": float(abs(yte - ytr.mean()).mean())}
    groups = {"A": ["A"], "V": ["V"], "L": ["L"], "full": ["A", "V", "L"]}
    for key, ms in groups.items():
        xtr = torch.cat([ftr[m] for m in ms], 1).numpy()
        xte = torch.cat([fte[m] for m in ms], 1).numpy()
        reg = make_pipeline(StandardScaler(), RidgeCV(alphas=tuple(alphas)))
        reg.fit(xtr, ytr)
        pred = reg.predict(xte)
        res[f"mae_{key}"] = float(abs(pred - yte).mean())
        res[f"corr_{key}"] = float(np.corrcoef(pred, yte)[0, 1])
    cap = 20000  # frames used for the per-frame regressions (enough for a stable R^2, cheap)
    for m in MODALITIES:
        others = [o for o in MODALITIES if o != m]
        xtr = torch.cat([tr.features[o].reshape(-1, tr.features[o].shape[-1]) for o in others], 1)[:cap].numpy()
        xte = torch.cat([te.features[o].reshape(-1, te.features[o].shape[-1]) for o in others], 1)[:cap].numpy()
        reg = make_pipeline(StandardScaler(), RidgeCV(alphas=tuple(alphas)))
        reg.fit(xtr, tr.features[m].reshape(-1, tr.features[m].shape[-1])[:cap].numpy())
        res[f"frame_r2_{m}"] = float(reg.score(xte, te.features[m].reshape(-1, te.features[m].shape[-1])[:cap].numpy()))
    res["frac_zero"] = float((yte == 0).mean())
    res["frac_near0"] = float((abs(yte) <= 0.5).mean())
    return res


# ======================================================================================================================
# Synthetic dialogues
# ======================================================================================================================
# (arousal, valence) of the six IEMOCAP-ERC classes; happy / excited and angry / frustrated are close on purpose,
# as the pairs most confused on the real data.
_AROUSAL_VALENCE_6 = ((0.5, 1.0), (-1.0, -0.8), (0.0, 0.0), (1.1, -1.0), (1.1, 0.8), (0.4, -0.7))

DIALOGUE_PRESETS = {
    "iemocap": {"dims": IEMOCAP_ERC_DIMS, "sizes": (120, 12, 31), "dialogue_lengths": (10, 110)},
    "small": {"dims": ModalityDims(24, 20, 16), "sizes": (40, 8, 12), "dialogue_lengths": (10, 40)},
}
_SPLITS = ("train", "val", "test")


def _markov_labels(gen: torch.Generator, lens: torch.Tensor, prior: torch.Tensor, inertia: float) -> torch.Tensor:
    """Labels of all utterances: per dialogue a chain that keeps the previous label with probability ``inertia``
    and otherwise draws afresh from ``prior`` (restarted at each dialogue; ``prior`` stays stationary)."""
    n = int(lens.sum())
    starts = torch.cumsum(lens, 0) - lens
    is_start = torch.zeros(n, dtype=torch.bool)
    is_start[starts] = True
    stay = (torch.rand(n, generator=gen) < inertia) & ~is_start
    fresh = torch.multinomial(prior, n, replacement=True, generator=gen)
    # The label at k is the fresh draw at the last position <= k that did not "stay".
    src = torch.where(stay, torch.zeros(n, dtype=torch.int64), torch.arange(n))
    return fresh[torch.cummax(src, 0).values]


def _turns(gen: torch.Generator, lens: torch.Tensor, cast: torch.Tensor, switch_prob: float) -> torch.Tensor:
    """Speaker index (within each dialogue's cast of ``cast[g]`` people) of every utterance: a random first
    speaker, then with probability ``switch_prob`` the turn passes to one of the others, uniformly."""
    n = int(lens.sum())
    dlg = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    starts = torch.cumsum(lens, 0) - lens
    size = cast[dlg]
    first = (torch.rand(lens.numel(), generator=gen) * cast).long().clamp_max(cast - 1)
    switch = torch.rand(n, generator=gen) < switch_prob
    step = 1 + (torch.rand(n, generator=gen) * (size - 1).clamp_min(1)).long()
    step = torch.where(switch & (size > 1), step, torch.zeros_like(step))
    step[starts] = 0
    shift = torch.cumsum(step, 0)
    shift = shift - shift[starts][dlg]
    return (first[dlg] + shift) % size


def make_synthetic_dialogues(
    n_dialogues_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    *,
    preset: str = "iemocap",
    dims: ModalityDims | Sequence[int] | None = None,
    seed: int = 0,
    dialogue_lengths: tuple[int, int] | None = None,
    speakers_per_dialogue: tuple[int, int] = (2, 2),
    switch_prob: float = 0.8,
    label_inertia: float = 0.7,
    latent_dim: int = 8,
    context_dim: int = 4,
    class_sep: float = 0.85,
    other_sep: float = 0.6,
    shared_noise: float = 0.6,
    context_weight: float = 1.5,
    speaker_effect: float = 0.3,
    feature_noise: float = 0.25,
    val_from: str = "train",
) -> dict[str, DialogueDataset]:
    r"""Synthetic ERC dialogues (the embedded default of MMGCN): seeded, offline, IEMOCAP-ERC-shaped.

    Generative model - the utterance model of :func:`make_synthetic_utterances` in *vector mode*. That model draws
    frame sequences ``x_t = e_t P_m u_m + sigma_f xi_t``; an ERC pickle holds one vector per utterance, so here each
    utterance gets ``x_m = P_m u_m + feature_noise * eps`` directly (``feature_noise`` 0.25 = the frame noise left
    after averaging about 16 frames), with the same pieces:

    * six classes in IEMOCAP-ERC's order and proportions (``IEMOCAP_ERC_CLASS_FREQUENCIES``) - so MMGCN's IEMOCAP
      class weights apply unchanged; class means ``mu_c`` with (arousal, valence) in coordinates 0 and 1 (happy and
      excited, angry and frustrated close to each other, as the pairs confused on real data) and random
      orthonormal directions of norm ``other_sep * sqrt(K - 2)`` elsewhere;
    * emotional state ``z = class_sep mu_y + speaker_effect delta_s + shared_noise n`` with a per-dialogue,
      per-participant offset ``delta_s ~ N(0, I)`` (a speaker's style), a class-free context ``c ~ N(0, I)``,
      modality views ``u_m = w_m * [z; c] + b_m eps`` with the loadings / nuisance scales of the utterance generator
      (lexical > acoustic > visual) and projections ``P_m`` (``N(0, 1/(K+K_c))``);
    * dialogues of ``U{lo..hi}`` utterances (``dialogue_lengths``, 10..110 by default), ``U{speakers_per_dialogue}``
      participants (2 by default, IEMOCAP's dyads; speaker ids are positions in the cast, ``num_speakers`` =
      the largest cast) taking turns (the turn passes with probability ``switch_prob``);
    * labels with inertia: each dialogue's labels are a Markov chain that keeps the previous emotion with probability
      ``label_inertia`` (0.7) and otherwise draws from the class prior, so neighbouring utterances tend to share the
      emotion and a context model (the BiLSTM, the graph) beats an utterance-level one
      (:func:`label_persistence`: P(same as previous) ~ 0.76 against ~ 0.19 by chance).

    Calibration (``class_sep`` 0.85 was chosen for it). Logistic regression (C = 0.1, standardised features) fit on
    120 training dialogues and scored on 31 test dialogues, dims 60 / 50 / 40, seeds 0 / 1: one utterance alone -
    A 0.38 / 0.39, V 0.28 / 0.30, L 0.48 / 0.48, all three 0.54 / 0.55 accuracy; with the mean features of the
    utterances within +-3 positions appended - all three 0.65 / 0.66 (weighted F1 within 0.01 of accuracy). That is
    the IEMOCAP-ERC regime: utterance-level models in the mid 50s, MMGCN's published weighted F1 66.2. A 16-layer
    MMGCN trained 20 epochs (the authors' run.sh hyper-parameters) on the same data reaches a test weighted F1 of 0.62.

    Parameters
    ----------
    n_dialogues_train, n_val, n_test : int, optional
        Dialogues per split (preset ``iemocap``: 120 / 12 / 31, IEMOCAP's 120 / 31 plus a 10 % validation set;
        ``small``: 40 / 8 / 12 with 10..40 utterances and dims 24 / 20 / 16, for tests and CPU demos).
    preset : {"iemocap", "small"}
    dims : ModalityDims, optional
        Feature sizes (default IEMOCAP-ERC's A 1582, V 342, L 100).
    seed : int
        Everything is a deterministic function of the arguments; splits use their own streams, so the test set
        does not change with the training-set size.
    val_from : {"train", "test"}
        ``"test"``: ``val`` is the test set (the authors' protocol, see :func:`load_iemocap_erc`); ``"train"``:
        the separately generated validation dialogues (same distribution as train).

    Returns
    -------
    dict
        ``{"train", "val", "test"}`` -> :class:`DialogueDataset`.
    """
    if preset not in DIALOGUE_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {tuple(DIALOGUE_PRESETS)}")
    cfg = DIALOGUE_PRESETS[preset]
    sizes = [cfg["sizes"][k] if n is None else int(n) for k, n in enumerate((n_dialogues_train, n_val, n_test))]
    if any(s < 0 for s in sizes):
        raise ValueError(f"dialogue counts must be >= 0, got {sizes}")
    dims = ModalityDims(*(int(d) for d in (cfg["dims"] if dims is None else dims)))
    lo, hi = (int(x) for x in (cfg["dialogue_lengths"] if dialogue_lengths is None else dialogue_lengths))
    if not 1 <= lo <= hi:
        raise ValueError(f"dialogue_lengths must be (lo, hi) with 1 <= lo <= hi, got {(lo, hi)}")
    s_lo, s_hi = (int(x) for x in speakers_per_dialogue)
    if not 1 <= s_lo <= s_hi:
        raise ValueError(f"speakers_per_dialogue must be (lo, hi) with 1 <= lo <= hi, got {(s_lo, s_hi)}")
    if latent_dim < 2 or context_dim < 0:
        raise ValueError("latent_dim must be >= 2 and context_dim >= 0")
    if val_from not in VAL_PROTOCOLS:
        raise ValueError(f"val_from must be one of {VAL_PROTOCOLS}, got {val_from!r}")
    k, kc = int(latent_dim), int(context_dim)
    num_classes = len(IEMOCAP_ERC_CLASS_NAMES)

    # Structure (shared by the splits).
    g0 = torch.Generator().manual_seed(derive_seed(seed, 1000, scheme="splitmix"))
    mu = torch.zeros(num_classes, k)
    mu[:, :2] = torch.tensor(_AROUSAL_VALENCE_6)
    other = torch.randn(k - 2, num_classes, generator=g0, dtype=torch.float64)
    if k - 2 >= num_classes:
        other = torch.linalg.qr(other).Q * math.sqrt(k - 2)
    mu[:, 2:] = other_sep * other.T.to(torch.float32)
    proj = {m: torch.randn(dims[j], k + kc, generator=g0) / math.sqrt(k + kc) for j, m in enumerate(MODALITIES)}
    loadings = {}
    for m in MODALITIES:
        wa, wv, wo, _ = MODALITY_PROFILES[m]
        loadings[m] = torch.cat([torch.tensor([wa, wv]), torch.full((k - 2,), wo), torch.full((kc,), context_weight)])
    prior = torch.tensor(IEMOCAP_ERC_CLASS_FREQUENCIES, dtype=torch.float64)

    out: dict[str, DialogueDataset] = {}
    for s_idx, (split, n_dlg) in enumerate(zip(_SPLITS, sizes)):
        if n_dlg == 0:
            out[split] = DialogueDataset([], [], [], [], [], [], class_names=IEMOCAP_ERC_CLASS_NAMES,
                                         num_speakers=s_hi, dims=dims)
            continue
        gen = torch.Generator().manual_seed(derive_seed(seed, 1001 + s_idx, scheme="splitmix"))
        lens = torch.randint(lo, hi + 1, (n_dlg,), generator=gen)
        cast = torch.randint(s_lo, s_hi + 1, (n_dlg,), generator=gen)
        n = int(lens.sum())
        dlg = torch.repeat_interleave(torch.arange(n_dlg), lens)
        labels = _markov_labels(gen, lens, prior, label_inertia)
        speakers = _turns(gen, lens, cast, switch_prob)
        offsets = torch.randn(n_dlg, s_hi, k, generator=gen)  # each participant's style, per dialogue
        z = class_sep * mu[labels] + speaker_effect * offsets[dlg, speakers] + shared_noise * torch.randn(
            n, k, generator=gen)
        state = torch.cat([z, torch.randn(n, kc, generator=gen)], 1)
        feats = {}
        for m in MODALITIES:
            u = loadings[m] * state + MODALITY_PROFILES[m][3] * torch.randn(n, k + kc, generator=gen)
            feats[m] = u @ proj[m].T
            feats[m] += feature_noise * torch.randn(feats[m].shape, generator=gen)
        sizes_l = lens.tolist()
        names = [f"syn_{split}_d{g:04d}" for g in range(n_dlg)]
        out[split] = DialogueDataset(
            *(list(torch.split(feats[m], sizes_l)) for m in MODALITIES),
            list(torch.split(speakers, sizes_l)), list(torch.split(labels, sizes_l)), names,
            class_names=IEMOCAP_ERC_CLASS_NAMES, num_speakers=s_hi, dims=dims,
            utterance_names=[[f"{nm}_u{u:03d}" for u in range(L)] for nm, L in zip(names, sizes_l)])
    if val_from == "test":
        out["val"] = out["test"]
    return out
