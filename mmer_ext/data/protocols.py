"""Missing-modality protocols: the six MMIN conditions, the dataset wrapper that assigns them, and batch corruption.

Conditions
----------
A condition is an availability mask over the modalities ``(A, V, L)`` (1 = present). MMIN, IF-MMIN and NMER use the
six non-empty, non-full masks, in this order (row index = condition id)::

    0 azz [1,0,0]   1 zvz [0,1,0]   2 zzl [0,0,1]   3 avz [1,1,0]   4 azl [1,0,1]   5 zvl [0,1,1]

and id 6 (``FULL_CONDITION``) is the full mask ``[1,1,1]``.

Protocols (:class:`MissingConditionDataset`)
--------------------------------------------
* ``"train"``: every utterance gets one of the six conditions, uniformly at random, redrawn each epoch and never full
  (MMIN's training protocol). The authors draw the condition for each sample with the global RNG inside
  ``__getitem__`` (and, MMIN#9, draw an unrelated ``miss_type`` independently); here the draw for an epoch is one
  vectorised call of a ``torch.Generator`` seeded by ``(seed, epoch)``, so a run is reproducible whatever the
  number of DataLoader workers, and the mask and the condition id always agree.
* ``"train+full"``: one of the seven (six + full), the "augmented" baseline.
* ``"expand"``: the test/validation expansion: item ``k`` is utterance ``k % N`` under condition ``k // N``, so the
  set has ``6 N`` items in blocks azz, zvz, zzl, avz, azl, zvl.
* ``"full"``: every modality present.

Corruption (:func:`corrupt_batch`)
----------------------------------
Batches carry clean features; :func:`corrupt_batch` turns them into model input in one vectorised step per modality:
``"zero"`` multiplies each modality by its availability bit (MMIN); ``"gaussian"`` / ``"impulse"`` apply NMER's
forward-diffusion step to the missing modalities only,

.. math:: x \\leftarrow \\sqrt{\\bar\\alpha_t}\\,x + \\sqrt{1-\\bar\\alpha_t}\\,\\epsilon,

with :math:`\\epsilon \\sim N(0, I)` or the impulse noise :math:`\\mathrm{sign}(N(0,I))\\,1[U > 0.7]` and one
:math:`t \\sim U\\{0..T-1\\}` per modality per batch (as the authors; ``per="sample"`` draws one per sample).
Padding frames (beyond each sequence's length) stay exactly zero so max-pooling encoders see the same padding as in
the clean batch (``noise_padding=True`` noises them too, as the authors' scheduler does on the padded tensor).

Evaluation draws ``t`` per utterance (:func:`mmer_ext.train.evaluation.evaluate_model`, ``noise_per="sample"``):
the test expansion runs its batches in condition order, so one ``t`` per 256-item batch would give each condition's
score only a handful of noise levels (the authors' shuffled 128-item test batches mix conditions instead).

Missing rate (IMDer, MOSI / MOSEI)
----------------------------------
IMDer and its siblings (DiCMoR, GCNet's tables) sweep a *missing rate* ``MR`` in :data:`MISSING_RATES`, defined as
:math:`MR = \\sum_i N_i / (3 N)` with :math:`N_i` the number of samples that lack modality :math:`i`. Every sample
keeps at least one modality, so a fraction ``a`` of the samples loses two modalities and a fraction ``b`` loses one,
:math:`MR = (2a + b) / 3`. :func:`missing_rate_fractions` returns the authors' table (``miss_2`` / ``miss_1``)::

    MR    0.0  0.1  0.2  0.3  0.4  0.5  0.6  0.7
    a     0    0.1  0.2  0.3  0.5  0.7  0.9  1.0
    b     0    0.1  0.2  0.3  0.2  0.1  0    0
    2a+b  0    0.3  0.6  0.9  1.2  1.5  1.8  2.0   (= 3 MR, except MR = 0.7: capped at a = 1, realised MR = 2/3)

``MR = 0.7`` cannot be reached while keeping one modality per sample (the maximum is 2/3); the authors keep the row
and train at the cap, and so does this table: :func:`realized_missing_rate` of a 0.7 pattern is 0.667. The authors
index their lists with ``int(MR * 10 - 1)``, so ``MR = 0.0`` reads index -1 ("every batch misses two modalities",
IMDer#2/#6); here ``MR = 0.0`` means complete data, ``(a, b) = (0, 0)``.

:func:`missing_rate_patterns` turns ``(a, b)`` into an availability mask, under one of two protocols:

* ``"per-batch"`` (the authors): items are cut, in the order given, into batches of ``batch_size``, and every item
  of a batch misses the same modalities. The batches are counted as the authors count them: with ``nb`` batches
  and ``N = round(nb / 10) * 10`` (Python's / numpy's round, half to even), batch ``k`` (in order) misses two
  modalities while ``k2 / N < a`` (``k2`` the batches that already did), then one while ``k1 / N < b``, and the rest
  are complete; the comparisons run in float64 on the authors' float fractions, as theirs do. So the MOSI test set
  (686 rows, batches of 32: ``nb = 22``, ``N = 20``) at MR 0.7 has 20 batches missing two modalities and 2 complete
  ones, and 25 batches count as ``N = 20``, 35 as ``N = 40``. Up to 5 batches ``N`` would be 0 (the authors' code
  then divides by zero and misses nothing); there ``N = nb`` is used. With shuffled loaders the items
  in each group change every epoch, but the realised rate depends on the batch count.
* ``"per-sample"``: exactly ``round(a * N)`` rows miss two and ``round(b * N)`` miss one, at shuffled positions, each
  row with its own modalities, so the realised rate matches the table for any ``N`` and any batch size.

Which modalities go missing is uniform: the kept one (missing two) or the dropped one (missing one) is drawn uniformly
from A, V, L. Counts use round-half-up on the exact decimal fractions (``0.1 * 5`` -> 1, never a binary-float
surprise).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import torch
from torch.utils.data import Dataset

from mmer_ext.seeding import derive_seed

MODALITIES = ("A", "V", "L")
MISSING_CONDITIONS = torch.tensor(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=torch.int64
)
FULL_CONDITION = 6
ALL_CONDITIONS = torch.cat([MISSING_CONDITIONS, torch.ones(1, 3, dtype=torch.int64)])
CONDITION_NAMES = ("azz", "zvz", "zzl", "avz", "azl", "zvl", "avl")
CONDITION_LABELS = ("{a}", "{v}", "{l}", "{a,v}", "{a,l}", "{v,l}", "{a,v,l}")
PROTOCOL_MODES = ("train", "train+full", "expand", "full")
CORRUPTION_MODES = ("zero", "gaussian", "impulse")

# Code of a mask row read as the binary number A*4 + V*2 + L -> condition id (-1: the empty mask, never used).
_CODE_TO_CONDITION = torch.tensor([-1, 2, 1, 5, 0, 4, 3, 6], dtype=torch.int64)


def condition_index(missing_index: torch.Tensor) -> torch.Tensor:
    """Condition id (0..5, 6 = full) of each availability row of ``missing_index`` ``[..., 3]``.

    Raises ``ValueError`` for an all-missing row, which no protocol produces.
    """
    m = torch.as_tensor(missing_index).to(torch.int64)
    code = m[..., 0] * 4 + m[..., 1] * 2 + m[..., 2]
    out = _CODE_TO_CONDITION.to(code.device)[code]
    if (out < 0).any():
        raise ValueError("missing_index has a row with every modality missing")
    return out


class MissingConditionDataset(Dataset):
    """Wrap a dataset so that each item carries an availability mask (``"missing_index"``) and ``"condition"`` id.

    Parameters
    ----------
    base : Dataset
        Usually an :class:`~mmer_ext.data.UtteranceDataset`; items must be dicts.
    mode : {"train", "train+full", "expand", "full"}
        Protocol (see the module docstring).
    seed : int
        Seed of the per-epoch condition draws (``train`` modes); the draw of epoch ``e`` depends only on
        ``(seed, e)``.

    Notes
    -----
    Features are returned clean; :func:`corrupt_batch` applies the mask. ``"index"`` stays the base utterance index
    (for ``expand``, item ``k`` has index ``k % N`` and condition ``k // N``). Call :meth:`set_epoch` before building
    the epoch's DataLoader iterator (with ``persistent_workers`` the workers keep the draw they were started with).
    """

    def __init__(self, base: Dataset, mode: str = "train", seed: int = 0) -> None:
        if mode not in PROTOCOL_MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {PROTOCOL_MODES}")
        self.base = base
        self.mode = mode
        self.seed = int(seed)
        self.epoch = 0
        self._n = len(base)
        self._conditions: torch.Tensor | None = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Redraw the training conditions for ``epoch`` (deterministic in ``(seed, epoch)``)."""
        self.epoch = int(epoch)
        if self.mode in ("train", "train+full"):
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, scheme="splitmix"))
            high = 6 if self.mode == "train" else 7
            self._conditions = torch.randint(0, high, (self._n,), generator=g, dtype=torch.int64)
        elif self.mode == "expand":
            self._conditions = torch.arange(6, dtype=torch.int64).repeat_interleave(self._n)
        else:
            self._conditions = torch.full((self._n,), FULL_CONDITION, dtype=torch.int64)

    @property
    def conditions(self) -> torch.Tensor:
        """int64 ``[len(self)]``: the condition id of every item for the current epoch."""
        return self._conditions

    @property
    def missing_index(self) -> torch.Tensor:
        """int64 ``[len(self), 3]``: the availability mask of every item for the current epoch."""
        return ALL_CONDITIONS[self._conditions]

    def __len__(self) -> int:
        return 6 * self._n if self.mode == "expand" else self._n

    def __getitem__(self, k: int) -> dict[str, Any]:
        k = int(k)
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        item = dict(self.base[k % self._n] if self._n else {})
        cond = int(self._conditions[k])
        item["condition"] = cond
        item["missing_index"] = ALL_CONDITIONS[cond].clone()
        return item


class NoiseScheduler:
    """NMER's noise scheduler: a DDPM forward process whose step ``t`` sets how strongly a missing modality is noised.

    Parameters
    ----------
    num_steps : int
        ``T``; NMER's intensity knob (20..100 in its plots, 100 in its scripts).
    beta_start, beta_end : float
        ``0.01`` and ``0.5`` as NMER.
    schedule : {"scaled_linear", "linear"}
        ``scaled_linear``: ``betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2`` (NMER's choice);
        ``linear``: ``linspace(beta_start, beta_end, T)``.

    Attributes
    ----------
    betas, alphas_cumprod : Tensor
        float64 ``[T]``; ``alphas_cumprod[t] = prod_{s<=t} (1 - betas[s])`` (computed in float64 so the tiny values at
        large ``t`` are exact).
    """

    def __init__(self, num_steps: int = 100, beta_start: float = 0.01, beta_end: float = 0.5,
                 schedule: str = "scaled_linear") -> None:
        if num_steps < 1:
            raise ValueError("num_steps must be >= 1")
        self.num_steps = int(num_steps)
        self.schedule = schedule
        if schedule == "scaled_linear":
            betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_steps, dtype=torch.float64) ** 2
        elif schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        else:
            raise ValueError(f"unknown schedule {schedule!r}")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)

    def sample_t(self, batch_size: int, generator: torch.Generator | None = None, per: str = "batch") -> torch.Tensor:
        """Draw steps ``t ~ U{0..T-1}`` as int64 ``[batch_size]``: one shared value (``per="batch"``, as the authors)
        or one per sample (``per="sample"``)."""
        dev = generator.device if generator is not None else torch.device("cpu")
        if per == "batch":
            t = torch.randint(0, self.num_steps, (1,), generator=generator, device=dev)
            return t.expand(batch_size).cpu().clone()
        if per == "sample":
            return torch.randint(0, self.num_steps, (batch_size,), generator=generator, device=dev).cpu()
        raise ValueError(f"per must be 'batch' or 'sample', got {per!r}")

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``sqrt(abar_t) x + sqrt(1 - abar_t) noise`` with ``t`` int64 ``[B]`` broadcast over the other dims."""
        abar = self.alphas_cumprod[t.cpu()].to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return abar.sqrt() * x + (1.0 - abar).sqrt() * noise

    def __repr__(self) -> str:
        return f"NoiseScheduler(num_steps={self.num_steps}, schedule={self.schedule!r})"


def _noise_like(x: torch.Tensor, kind: str, generator: torch.Generator | None, occur_freq: float) -> torch.Tensor:
    dev = generator.device if generator is not None else x.device
    eps = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype)
    if kind == "impulse":
        u = torch.rand(x.shape, generator=generator, device=dev, dtype=x.dtype)
        eps = torch.sign(eps) * (u > occur_freq).to(x.dtype)
    return eps.to(x.device)


def corrupt_batch(
    batch: dict[str, Any],
    mode: str = "zero",
    scheduler: NoiseScheduler | None = None,
    generator: torch.Generator | None = None,
    *,
    per: str = "batch",
    occur_freq: float = 0.7,
    noise_padding: bool = False,
) -> dict[str, Any]:
    """Turn a clean batch into model input according to its ``missing_index``.

    Parameters
    ----------
    batch : dict
        From :func:`~mmer_ext.data.collate_utterances`; reads ``"A"``, ``"V"``, ``"L"`` ``[B, T_m, D_m]``,
        ``"missing_index"`` ``[B, 3]`` (all present when absent) and ``"lengths"`` ``[B, 3]`` (all frames valid when
        absent). Utterance-level vectors ``[B, D_m]`` (dialogue batches) work too; ``"lengths"`` is then not read.
    mode : {"zero", "gaussian", "impulse"}
        ``zero``: missing modalities multiplied by 0 (MMIN / IF-MMIN). ``gaussian`` / ``impulse``: NMER's noising of
        the missing modalities, ``sqrt(abar_t) x + sqrt(1-abar_t) eps``; present modalities are untouched.
    scheduler : NoiseScheduler, optional
        Needed by the noise modes; defaults to ``NoiseScheduler()`` (T = 100 as NMER's scripts).
    generator : torch.Generator, optional
        Source of every random draw (``t`` and ``eps``); the global RNG when omitted. Its device may differ from the
        batch's (noise is drawn on the generator's device and moved).
    per : {"batch", "sample"}
        One ``t`` per modality per batch (authors) or per sample.
    occur_freq : float
        Impulse noise is nonzero where ``U > occur_freq`` (0.7 -> about 30 % of entries are +-1).
    noise_padding : bool
        False (default): frames past each sequence's length stay zero. True: the whole padded tensor is noised, as
        the authors' scheduler does (recipe ``nmer-authors``).

    Returns
    -------
    dict
        A new dict: ``"A"``, ``"V"``, ``"L"`` corrupted; ``"A_clean"``, ``"V_clean"``, ``"L_clean"`` the inputs;
        ``"noise_t"`` int64 ``[B, 3]`` (noise modes only); every other key passed through. Frames beyond each
        sequence's length stay zero.
    """
    if mode not in CORRUPTION_MODES:
        raise ValueError(f"unknown corruption mode {mode!r}; expected one of {CORRUPTION_MODES}")
    out = dict(batch)
    b = batch["A"].shape[0]
    mi = batch.get("missing_index")
    if mi is None:
        mi = torch.ones(b, 3, dtype=torch.int64)
    lengths = batch.get("lengths")
    if mode != "zero" and scheduler is None:
        scheduler = NoiseScheduler()
    noise_t = torch.zeros(b, 3, dtype=torch.int64)
    for j, m in enumerate(MODALITIES):
        x = batch[m]
        out[f"{m}_clean"] = x
        present = mi[:, j].to(device=x.device, dtype=torch.bool).view(-1, *([1] * (x.dim() - 1)))
        if mode == "zero":
            out[m] = x * present.to(x.dtype)
            continue
        t = scheduler.sample_t(b, generator, per=per)
        noise_t[:, j] = t
        noisy = scheduler.add_noise(x, _noise_like(x, mode, generator, occur_freq), t)
        if lengths is not None and x.dim() == 3 and not noise_padding:
            # Frame sequences: the padding past each utterance's length stays zero.
            valid = torch.arange(x.shape[1], device=x.device) < lengths[:, j].to(x.device).view(-1, 1)
            noisy = noisy * valid.unsqueeze(-1).to(x.dtype)
        out[m] = torch.where(present, x, noisy)
    if mode != "zero":
        out["noise_t"] = noise_t
    return out


# ======================================================================================================================
# IMDer missing-rate protocol
# ======================================================================================================================
#: The missing rates of IMDer's sweep (MOSI / MOSEI tables).
MISSING_RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
#: Protocols of :func:`missing_rate_patterns`.
MR_PROTOCOLS = ("per-sample", "per-batch")

# (miss_2, miss_1) per MR index 0..7 as exact decimals; index 0 is the fixed MR = 0.0 row (the authors' -1 index).
_MR_TABLE = tuple((Fraction(a), Fraction(b)) for a, b in (
    ("0", "0"), ("0.1", "0.1"), ("0.2", "0.2"), ("0.3", "0.3"), ("0.5", "0.2"), ("0.7", "0.1"), ("0.9", "0"),
    ("1", "0")))


def _mr_row(mr: float) -> tuple[Fraction, Fraction]:
    try:
        x = float(mr)
    except (TypeError, ValueError):
        raise ValueError(f"mr must be one of {MISSING_RATES}, got {mr!r}") from None
    k = int(round(x * 10)) if math.isfinite(x) else -1
    if not (0 <= k < len(_MR_TABLE) and abs(x - MISSING_RATES[k]) < 1e-9):
        raise ValueError(f"mr must be one of {MISSING_RATES} (IMDer's table has no other rows), got {mr!r}")
    return _MR_TABLE[k]


def missing_rate_fractions(mr: float) -> tuple[float, float]:
    """``(a, b)``: the fractions of samples (or batches) missing two and one modalities at missing rate ``mr``.

    IMDer's table (see the module docstring); ``mr`` must be one of :data:`MISSING_RATES`, anything else is a
    ``ValueError``. ``MR = 0.0`` gives ``(0.0, 0.0)`` (the authors' code would give "all miss two");
    ``(2a + b) / 3 == mr`` for every row but 0.7, which is capped at ``(1.0, 0.0)`` (realised rate 2/3).
    """
    a, b = _mr_row(mr)
    return float(a), float(b)


def authors_batch_counts(num_batches: int, mr: float) -> tuple[int, int]:
    """``(n2, n1)``: how many of ``num_batches`` batches (the first ones, in order) miss two and one modalities at
    missing rate ``mr`` under the authors' per-batch protocol (module docstring): they count against
    ``N = round(num_batches / 10) * 10`` (``N = num_batches`` when that is 0)."""
    if isinstance(num_batches, bool) or int(num_batches) != num_batches or num_batches < 0:
        raise ValueError(f"num_batches must be a non-negative integer, got {num_batches!r}")
    nb = int(num_batches)
    a, b = (float(f) for f in _mr_row(mr))
    denom = float(round(nb / 10) * 10) or float(nb)
    n2 = 0
    while n2 < nb and n2 / denom < a:
        n2 += 1
    n1 = 0
    while n2 + n1 < nb and n1 / denom < b:
        n1 += 1
    return n2, n1


def _round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def _masks_from_kinds(kinds: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """Rows of kind 2 keep only modality ``choice``, kind 1 drop only ``choice``, kind 0 keep all."""
    one_hot = torch.nn.functional.one_hot(choice, 3).to(torch.int64)
    out = torch.ones(kinds.numel(), 3, dtype=torch.int64)
    out = torch.where((kinds == 2).unsqueeze(1), one_hot, out)
    return torch.where((kinds == 1).unsqueeze(1), 1 - one_hot, out)


def missing_rate_patterns(
    num_items: int,
    mr: float,
    *,
    protocol: str = "per-sample",
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Availability masks realising missing rate ``mr``: int64 ``[num_items, 3]`` in A, V, L order, 1 = present.

    Parameters
    ----------
    num_items : int
        Number of rows (samples).
    mr : float
        One of :data:`MISSING_RATES`.
    protocol : {"per-sample", "per-batch"}
        See the module docstring. ``"per-batch"`` needs ``batch_size``: row ``k`` belongs to batch
        ``k // batch_size``, so pass the rows in the order the loader will serve them.
    batch_size : int, optional
        Batch size of the ``"per-batch"`` protocol (ignored by ``"per-sample"``).
    generator : torch.Generator, optional
        Source of every random draw (positions and modalities); the global RNG when omitted. The same seed gives the
        same masks.

    Returns
    -------
    Tensor
        int64 ``[num_items, 3]``; every row keeps at least one modality.
    """
    if protocol not in MR_PROTOCOLS:
        raise ValueError(f"protocol must be one of {MR_PROTOCOLS}, got {protocol!r}")
    if isinstance(num_items, bool) or int(num_items) != num_items or num_items < 0:
        raise ValueError(f"num_items must be a non-negative integer, got {num_items!r}")
    n = int(num_items)
    a, b = _mr_row(mr)
    dev = generator.device if generator is not None else torch.device("cpu")
    if protocol == "per-sample":
        n2 = _round_half_up(a * n)
        n1 = min(_round_half_up(b * n), n - n2)
        kinds = torch.cat([torch.full((n2,), 2), torch.full((n1,), 1), torch.zeros(n - n2 - n1)]).to(torch.int64)
        perm = torch.randperm(n, generator=generator, device=dev).cpu()
        choice = torch.randint(0, 3, (n,), generator=generator, device=dev).cpu()
        return _masks_from_kinds(kinds[perm], choice)
    if batch_size is None or isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"the per-batch protocol needs a positive integer batch_size, got {batch_size!r}")
    bs = int(batch_size)
    nb = -(-n // bs)
    n2, n1 = authors_batch_counts(nb, mr)
    kinds = torch.cat([torch.full((n2,), 2), torch.full((n1,), 1), torch.zeros(nb - n2 - n1)]).to(torch.int64)
    choice = torch.randint(0, 3, (nb,), generator=generator, device=dev).cpu()
    per_batch = _masks_from_kinds(kinds, choice)
    return per_batch.repeat_interleave(bs, dim=0)[:n].contiguous()


def realized_missing_rate(missing_index: torch.Tensor) -> float:
    """The missing rate of a set of availability masks ``[N, 3]``: missing entries / (3 N) (0.0 for N = 0)."""
    m = torch.as_tensor(missing_index)
    if m.dim() != 2 or m.shape[1] != 3:
        raise ValueError(f"missing_index must be [N, 3], got shape {tuple(m.shape)}")
    if m.shape[0] == 0:
        return 0.0
    return float((1 - m.to(torch.float64)).mean())
